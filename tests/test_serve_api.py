"""The A1111 API subset (ldm.serve) through FastAPI's test client: the request bodies of A1111's API
documentation give PNGs with their settings in the text chunks and A1111's response fields;
img2img and inpainting with base64 images; models, samplers and options (switching the model);
every bad input is refused before work starts, naming the field, and leaves queued requests alone."""

import base64
import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldm.png_settings import settings_from_chunks
from ldm.serve import Limits, ModelCatalog, Server, ServeSettings, create_app
from serve_helpers import decode_png, make_server, png_base64, tiny_pipeline, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")

# The wiki's first example ("API" page of the A1111 wiki), and a body with every field A1111's
# /docs page shows for txt2img, as its clients send it (A1111's sampler names; ours work too).
WIKI_TXT2IMG = {"prompt": "maltese puppy", "steps": 5}
FULL_TXT2IMG = {
    "enable_hr": False, "denoising_strength": 0, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "string", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "prompt": "a red circle", "styles": [], "seed": 1234, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler a", "batch_size": 2, "n_iter": 1,
    "steps": 4, "cfg_scale": 7, "width": 32, "height": 48, "restore_faces": False, "tiling": False,
    "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "blurry", "eta": 0,
    "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
    "override_settings_restore_afterwards": True, "script_args": [], "sampler_index": "euler",
    "script_name": None, "send_images": True, "save_images": False, "alwayson_scripts": {},
}


@pytest.fixture(scope="module")
def server():
    s = make_server(max_batch=4)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with TestClient(create_app(server)) as c:
        yield c


def test_wiki_example_returns_a_png_with_its_settings(client):
    r = client.post("/sdapi/v1/txt2img", json=WIKI_TXT2IMG)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 1
    image = decode_png(body["images"][0])
    info = json.loads(body["info"])
    assert image.size == (32, 32)  # the model's default size: the request gave none
    recorded = settings_from_chunks(image.text).options
    assert recorded.prompt == "maltese puppy" and recorded.steps == 5
    assert recorded.seed == info["seed"] and info["all_seeds"] == [info["seed"]]
    assert "maltese puppy" in image.text["parameters"] and info["infotexts"] == [image.text["parameters"]]
    assert body["parameters"]["prompt"] == "maltese puppy" and body["parameters"]["steps"] == 5


def test_full_a1111_body_with_seed_gives_seed_plus_k_and_reproduces(client):
    r1 = client.post("/sdapi/v1/txt2img", json=FULL_TXT2IMG).json()
    r2 = client.post("/sdapi/v1/txt2img", json=FULL_TXT2IMG | {"batch_size": 1, "seed": 1235}).json()
    info = json.loads(r1["info"])
    assert info["all_seeds"] == [1234, 1235] and info["all_prompts"] == ["a red circle"] * 2
    assert info["width"] == 32 and info["height"] == 48 and info["sampler_name"] == "Euler a"
    assert info["all_negative_prompts"] == ["blurry", "blurry"] and info["cfg_scale"] == 7
    first, second = (decode_png(b) for b in r1["images"])
    assert first.size == (32, 48) and settings_from_chunks(second.text).options.seed == 1235
    # picture 2 of the request equals a request of its own with seed 1235
    assert np.array_equal(np.asarray(second), np.asarray(decode_png(r2["images"][0])))
    assert not np.array_equal(np.asarray(first), np.asarray(second))


def test_img2img_and_inpainting_with_base64_images(client):
    init = png_base64((40, 24), "blue")
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a red circle", "init_images": [init], "steps": 4,
                                                "denoising_strength": 0.5, "seed": 3})
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert (info["width"], info["height"], info["denoising_strength"]) == (40, 24, 0.5)
    assert r.json()["parameters"]["init_images"] is None  # not echoed unless include_init_images
    assert settings_from_chunks(decode_png(r.json()["images"][0]).text).options.strength == 0.5
    # mask: left half white (repaint); the kept right half stays the init image exactly
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    r = client.post("/sdapi/v1/img2img", json={
        "prompt": "x", "init_images": [png_base64((64, 64), "blue")], "mask": base64.b64encode(buf.getvalue()).decode(),
        "mask_blur": 0, "width": 32, "height": 32, "steps": 3, "denoising_strength": 1.0, "resize_mode": 1})
    assert r.status_code == 200, r.text
    out = np.asarray(decode_png(r.json()["images"][0]).convert("RGB")).astype(int)
    assert json.loads(r.json()["info"])["is_using_inpainting_conditioning"]
    assert (out[:, 20:] == [0, 0, 255]).all() and np.abs(out[:, :12] - [0, 0, 255]).max() > 30


def test_models_samplers_and_options(client, server):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["tiny.safetensors"] and models[0]["model_name"] == "tiny"
    samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert samplers["DPM++ 2M"] == {"name": "DPM++ 2M", "aliases": ["dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert "Euler a" in samplers and "ddpm" in samplers  # A1111's labels, then ours that A1111 lacks
    schedulers = {s["label"]: s for s in client.get("/sdapi/v1/schedulers").json()}
    assert schedulers["Karras"]["aliases"] == ["karras"] and schedulers["Automatic"]["aliases"] == []
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "tiny.safetensors" and options["ldm_defaults"]["width"] == 32
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd15.safetensors"})
    assert r.status_code == 422 and "tiny.safetensors" in r.json()["detail"][0]["msg"]


def test_options_switch_the_model_that_serves_requests():
    a, b = tiny_pipeline(seed=0), tiny_pipeline(seed=5)
    cat_a, cat_b = ModelCatalog.of_pipeline(a, "a.safetensors"), ModelCatalog.of_pipeline(b, "b.safetensors")
    server = Server(ModelCatalog([*cat_a.entries.values(), *cat_b.entries.values()]),
                    ServeSettings(max_batch=2, limits=Limits(max_size=64))).start()
    with TestClient(create_app(server)) as c:
        body = {"prompt": "x", "seed": 7, "steps": 3}
        from_a = c.post("/sdapi/v1/txt2img", json=body).json()
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "b.safetensors"}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "b.safetensors"
        from_b = c.post("/sdapi/v1/txt2img", json=body).json()
        pinned = c.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"sd_model_checkpoint": "a"}}).json()
    server.stop()
    pictures = [np.asarray(decode_png(r["images"][0])) for r in (from_a, from_b, pinned)]
    assert not np.array_equal(pictures[0], pictures[1]) and np.array_equal(pictures[0], pictures[2])
    assert json.loads(from_b["info"])["sd_model_name"] == "b"


BAD = [
    ({"prompt": "x", "steps": "many"}, ["body", "steps"], "valid integer"),
    ({"prompt": "x", "steps": 0}, ["body", "steps"], "greater than or equal to 1"),
    ({"prompt": "x", "steps": 151}, ["body", "steps"], "at most 150"),
    ({"prompt": "x", "cfg_scale": "NaN"}, ["body", "cfg_scale"], "finite"),
    ({"prompt": "x", "width": 30}, ["body", "width"], "multiple of 4 (got 30); try 28 or 32"),
    ({"prompt": "x", "height": 4096}, ["body", "height"], "at most 256"),
    ({"prompt": "x", "batch_size": 9, "n_iter": 2}, ["body", "batch_size"], "at most 16 per request"),
    ({"prompt": "x", "seed": -5}, ["body", "seed"], "greater than or equal to -1"),
    ({"prompt": "x", "sampler_name": "Euler Z"}, ["body", "sampler_name"], "unknown sampler"),
    ({"prompt": "x", "sampler_name": "DPM2 a"}, ["body", "sampler_name"], "nearest is 'euler_a'"),
    ({"prompt": "x", "sampler_name": "DPM++ 2M", "scheduler": "Wobbly"}, ["body", "scheduler"], "unknown schedule"),
    ({"prompt": "x", "enable_hr": True}, ["body", "enable_hr"], "hires fix"),
    ({"prompt": "x", "styles": ["cinematic"]}, ["body", "styles"], "no saved prompt styles"),
    ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}},
     ["body", "override_settings", "sd_model_checkpoint"], "unknown model"),
    ({"prompt": 5}, ["body", "prompt"], "valid string"),
    ({"prompt": "a <lora:paper:0.8> cat"}, ["body", "prompt"], "LoRA tags such as <lora:paper:0.8>"),
    ({"prompt": "x", "negative_prompt": "(blurry"}, ["body", "negative_prompt"], "'(' is never closed"),
]


@pytest.mark.parametrize("body,loc,message", BAD, ids=[str(b[1][-1]) + "-" + b[2].split()[0] for b in BAD])
def test_bad_txt2img_input_is_a_422_naming_the_field(client, body, loc, message):
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == loc and message in error["msg"]
    assert "input" not in error  # never echo what the client sent (it can be megabytes of base64)


BAD_IMG2IMG = [
    ({}, ["body", "init_images"], "at least one init image", 422),
    ({"init_images": ["@@@ not base64"]}, ["body", "init_images", 0], "not valid base64", 422),
    ({"init_images": [base64.b64encode(b"GIF89a but not really").decode()]}, ["body", "init_images", 0],
     "not an image", 422),
    ({"init_images": [png_base64()], "mask": "bm90IGFuIGltYWdl"}, ["body", "mask"], "not an image", 422),
    ({"init_images": [png_base64((3000, 3000))]}, ["body", "init_images", 0], "3000x3000 pixels", 413),
    ({"init_images": [png_base64()], "resize_mode": 3}, ["body", "resize_mode"], "latent upscale", 422),
    ({"init_images": [png_base64()], "denoising_strength": 1.5}, ["body", "denoising_strength"], "less than or equal", 422),
    ({"init_images": [png_base64()] * 3, "batch_size": 2}, ["body", "init_images"], "send 1 init image", 422),
]


@pytest.mark.parametrize("body,loc,message,status", BAD_IMG2IMG, ids=[b[2].split()[0] for b in BAD_IMG2IMG])
def test_bad_img2img_input_is_refused_naming_the_field(client, body, loc, message, status):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", **body})
    assert r.status_code == status
    (error,) = r.json()["detail"]
    assert error["loc"] == loc and message in error["msg"]


def test_pictures_share_u_net_calls_only_with_prompts_of_their_chunk_count(server):
    """A prompt longer than the context (or with BREAK) is encoded in more chunks, a longer context:
    batched with shorter prompts it would pad theirs, so their pictures would differ from their solo runs."""
    from ldm.serve.a1111 import request_job
    from ldm.serve.schemas import GenerationRequest

    def key(**body):
        return request_job(GenerationRequest(**body), server.catalog, Limits(max_size=256))[0].key

    short, long = key(prompt="a red circle"), key(prompt="a red circle BREAK on white")
    assert (short.chunks, long.chunks) == (1, 2) and short != long
    assert key(prompt="a red circle", negative_prompt="blurry BREAK dark").chunks == 2
    assert key(prompt="a blue square") == short


def test_unknown_fields_are_ignored_and_data_urls_accepted(client):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "no_such_field": {"a": 1},
                                               "init_images": ["data:image/png;base64," + png_base64()]})
    assert r.status_code == 200 and "no_such_field" not in r.json()["parameters"]


def test_oversized_body_is_a_413_before_it_is_read():
    server = make_server(max_body_mb=1, start=False)
    with TestClient(create_app(server)) as c:
        r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["A" * (2 << 20)]})
    assert r.status_code == 413 and "larger than 1 MiB" in r.json()["detail"]
    assert server.queue.status()["queued_images"] == 0


def test_bad_requests_leave_queued_requests_alone():
    """With requests waiting (the worker not started yet), bad ones are answered at once and the
    waiting ones then complete with the pictures they would have had anyway."""
    server = make_server(max_batch=2, start=False)
    with TestClient(create_app(server)) as c:
        results = {}

        def send(name, body):
            results[name] = c.post("/sdapi/v1/txt2img", json=body)

        good = [threading.Thread(target=send, args=(f"g{i}", {"prompt": f"p{i}", "seed": i, "steps": 3,
                                                              "force_task_id": f"g{i}"})) for i in range(3)]
        try:
            for i, t in enumerate(good):  # one at a time, so that the queue's order is g0, g1, g2
                t.start()
                wait_until(lambda: server.queue.status()["queued_images"] == i + 1, what=f"request g{i} queued")
            for body, _, _ in BAD[:6]:
                assert c.post("/sdapi/v1/txt2img", json=body).status_code == 422
            assert c.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["%%%"]}).status_code == 422
            assert c.post("/sdapi/v1/txt2img", json={"prompt": "x", "force_task_id": "g1"}).status_code == 422
            assert server.queue.status()["queued_images"] == 3
            assert [server.queue.position(server.queue.get(f"g{i}")) for i in range(3)] == [1, 2, 3]
        finally:  # the waiting requests are answered even when a check failed: leaving the client waits for them
            server.start()
            for t in good:
                t.join(120)
        solo = c.post("/sdapi/v1/txt2img", json={"prompt": "p1", "seed": 1, "steps": 3}).json()
    server.stop()
    assert all(results[f"g{i}"].status_code == 200 for i in range(3))
    assert np.array_equal(np.asarray(decode_png(results["g1"].json()["images"][0])),
                          np.asarray(decode_png(solo["images"][0])))


def test_resize_modes_follow_a1111():
    from ldm.serve.a1111 import _resize

    wide = Image.new("RGB", (40, 20), "white")
    wide.paste((255, 0, 0), (0, 0, 40, 4))  # red top rows
    wide.paste((0, 0, 255), (0, 16, 40, 20))  # blue bottom rows
    assert _resize(wide, 20, 20, 0).size == (20, 20)  # stretched
    crop = np.asarray(_resize(wide, 20, 20, 1)).astype(int)
    assert (crop[0] == [255, 0, 0]).all() and (crop[10] >= 250).all()  # covered, then cropped at the sides
    fill = np.asarray(_resize(wide, 20, 20, 2)).astype(int)  # fitted into rows 5..14, the rest from the edges
    assert (fill[:5] == fill[5]).all() and (fill[15:] == fill[14]).all()
    assert (np.abs(fill[:5] - [255, 0, 0]) <= 3).all() and (np.abs(fill[15:] - [0, 0, 255]) <= 3).all()
    assert (fill[10] >= 250).all()


def test_the_load_bench_recognises_an_answer_by_its_prompt_and_seed(client):
    from ldm.serve.loadtest import _answer_matches

    body = client.post("/sdapi/v1/txt2img", json={"prompt": "client 3 request 1", "seed": 3000001, "steps": 2}).json()
    assert _answer_matches(body, "client 3 request 1", 3000001)
    assert not _answer_matches(body, "client 3 request 2", 3000001)
    assert not _answer_matches(body, "client 3 request 1", 3000002)
