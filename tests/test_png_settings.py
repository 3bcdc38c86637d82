"""PNGs other tools read: A1111's `parameters` chunk in its exact format (checked with a parser written here
from A1111's description of the format), our settings as JSON under our own key, no chunk ComfyUI would
misread; `--from-png` / `settings_from_png` make an image again bit for bit, and read A1111's PNGs."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from helpers import FAST, ROOT, TINY, TINY_SD1, random_lora, randomize
from ldm import LDMPipeline
from ldm.cli import txt2img
from ldm.convert.lora import save_lora
from ldm.images import save_png
from ldm.png_settings import a1111_parameters, png_text, read_png_settings, settings_from_a1111, settings_from_png

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_ARGS = ["--config", str(TINY), *[a for o in FAST for a in ("--set", o)], "--device", "cpu"]
# The parameter line of the example in the docstring of A1111's own parser (modules/infotext_utils.py,
# parse_generation_parameters): an infotext of an A1111 release from before "Schedule type" existed,
# whose model hash was 8 hex digits of a part of the file.
A1111_DOC_PARAMS = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"


def reference_parse(text: str) -> dict[str, str]:
    """A1111's infotext read by its written description: the prompt lines, then a line starting with
    "Negative prompt: ", then one line of "Label: value" pairs joined by ", ", where a value holding a
    comma, colon or line break is a JSON string."""
    head, _, params = text.rpartition("\n")
    prompt, _, negative = head.partition("\nNegative prompt: ")
    fields = {"Prompt": prompt, "Negative prompt": negative}
    for m in re.finditer(r'([A-Za-z][^:,"]*): ("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)', params):
        fields[m.group(1)] = json.loads(m.group(2)) if m.group(2).startswith('"') else m.group(2)
    return fields


def test_parameters_follow_a1111s_format_and_order():
    info = {"prompt": "a red circle, (large:1.2)", "negative_prompt": "blurry, dark", "steps": 30, "cfg": 7.5,
            "sampler": "dpmpp_2m", "spacing": "karras", "seed": 1, "width": 512, "height": 768, "strength": 0.6,
            "guidance_rescale": 0.7, "eta": None}
    model = {"name": "my, model", "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
             "vae": "/models/vae-ft-mse-840000-ema-pruned.safetensors",
             "vae_sha256": "735e4c3a447a3255760d7f86845f09f9"}
    assert a1111_parameters(info, model) == (
        "a red circle, (large:1.2)\nNegative prompt: blurry, dark\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x768, "
        'Model hash: 6ce0161689, Model: "my, model", VAE hash: 735e4c3a44, '
        "VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
        "Denoising strength: 0.6, CFG Rescale: 0.7")
    # eta as A1111 writes it: only where it differs from the sampler's default, under DDIM's own label
    base = {"prompt": "x", "steps": 2, "cfg": 5, "seed": 0, "width": 64, "height": 64}
    assert a1111_parameters({**base, "sampler": "euler_a", "spacing": "linspace", "eta": 0.5}).endswith(
        "Sampler: Euler a, Schedule type: Uniform, CFG scale: 5, Seed: 0, Size: 64x64, Eta: 0.5")
    assert a1111_parameters({**base, "sampler": "euler_a", "spacing": "linspace", "eta": 1.0}).endswith("64x64")
    assert "Eta DDIM: 0.3" in a1111_parameters({**base, "sampler": "ddim", "spacing": "leading", "eta": 0.3})
    # no negative prompt: the line is still there (ComfyUI imports the text only with it), empty
    assert a1111_parameters({**base, "sampler": "ddpm", "spacing": "trailing"}).startswith(
        "x\nNegative prompt: \nSteps: 2, Sampler: ddpm, Schedule type: trailing")  # A1111 has no DDPM: our names


def test_the_chunks_are_a1111s_parameters_and_our_json_and_nothing_comfyui_misreads(tmp_path, tiny_pipe):
    image = tiny_pipe.generate("a cat: small, grey", negative_prompt="", steps=2, seed=5, sampler="DPM++ 2M Karras",
                               guidance_rescale=0.5, progress=False)[0]
    path = save_png(image, tmp_path / "a.png", png_text(image.info, {"name": "m"}, runtime={"device": "cpu"}))
    chunks = Image.open(path).text
    assert sorted(chunks) == ["ldm", "parameters"]  # ComfyUI parses `prompt` and `workflow` as its JSON graphs
    fields = reference_parse(chunks["parameters"])
    assert fields == {"Prompt": "a cat: small, grey", "Negative prompt": "", "Steps": "2", "Sampler": "DPM++ 2M",
                      "Schedule type": "Karras", "CFG scale": "7.5", "Seed": "5", "Size": "32x32", "Model": "m",
                      "CFG Rescale": "0.5"}
    # what ComfyUI's importA1111 looks for: "\nSteps:" starting the last line, "\nNegative prompt:" before it
    text = chunks["parameters"]
    assert text.rfind("\nNegative prompt:") < text.rfind("\nSteps:") and "\n" not in text[text.rfind("\nSteps:") + 1:]
    ours = json.loads(chunks["ldm"])
    assert ours["format"] == 1 and ours["model"] == {"name": "m"} and ours["runtime"] == {"device": "cpu"}
    assert ours["options"] == {k: v for k, v in image.info.items()}


def test_an_original_ckpt_through_the_command_line_gives_a1111_every_field(tmp_path):
    sd1 = randomize(LDMPipeline.from_config(TINY, TINY_SD1, seed=0))  # detectable: the SD 1.x conventions
    ckpt = sd1.save_single_file(tmp_path / "my-model.ckpt")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "tools/txt2img.py", "--ckpt", str(ckpt), "--prompt", "a red circle, big",
                        "--negative-prompt", "blurry: dark", "--sampler", "DPM++ 2M Karras", "--steps", "2",
                        "--cfg", "6.5", "--guidance-rescale", "0.5", "--seed", "42", "--height", "32", "--width", "40",
                        "--device", "cpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fields = reference_parse(Image.open(out / "00000-42.png").text["parameters"])
    assert fields == {"Prompt": "a red circle, big", "Negative prompt": "blurry: dark", "Steps": "2",
                      "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "6.5", "Seed": "42",
                      "Size": "40x32", "Model hash": hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10],
                      "Model": "my-model", "CFG Rescale": "0.5"}


def test_settings_from_png_makes_the_image_again_bit_for_bit(tmp_path, tiny_pipe):
    first = tiny_pipe.generate("a blue square", negative_prompt="red", steps=3, seed=17, sampler="euler_a", eta=0.7,
                               cfg=4.0, guidance_rescale=0.3, progress=False)[0]
    path = save_png(first, tmp_path / "first.png", png_text(first.info))
    options = LDMPipeline.settings_from_png(path)
    assert options == settings_from_png(path) and (options.seed, options.eta, options.spacing) == (17, 0.7, "trailing")
    again = tiny_pipe.generate(**options.to_dict(), progress=False)[0]
    assert again.tobytes() == Image.open(path).tobytes()


def test_a1111_infotexts_give_their_settings():
    doc = settings_from_a1111(f"a lighthouse at dusk, oil painting\nNegative prompt: blurry, (ugly:1.3)\n"
                              f"{A1111_DOC_PARAMS}")
    o = doc.options
    assert (o.prompt, o.negative_prompt) == ("a lighthouse at dusk, oil painting", "blurry, (ugly:1.3)")
    # no Schedule type: A1111 reads that as "Automatic", for Euler a the model's uniform sigmas
    assert (o.steps, o.sampler, o.spacing, o.cfg, o.seed, o.width, o.height) == (20, "euler_a", "linspace", 7.0,
                                                                                 965400086, 512, 512)
    assert doc.source == "a1111" and doc.model == {"hash": "45dee52b"} and doc.ignored == {}

    modern = settings_from_a1111(
        "portrait\nof a cat\nNegative prompt: lowres\nbad hands\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned"
        ".safetensors, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 10, Hires upscaler: "
        'Latent, Lora hashes: "detail: 0123456789ab, style: ba9876543210", Version: v1.10.1')
    o = modern.options
    assert (o.prompt, o.negative_prompt, o.sampler, o.spacing, o.width, o.height) == (
        "portrait\nof a cat", "lowres\nbad hands", "dpmpp_2m", "karras", 512, 768)
    # hires fix with the Latent upscaler is ours: its strength is the redraw's
    assert (o.hires_scale, o.hires_steps, o.hires_upscaler, o.strength) == (2.0, 10, "latent", 0.45)
    assert modern.model == {"name": "v1-5-pruned-emaonly", "hash": "6ce0161689",
                            "vae": "vae-ft-mse-840000-ema-pruned.safetensors", "vae_hash": "735e4c3a44"}
    assert modern.ignored == {"Clip skip": "2", "Lora hashes": "detail: 0123456789ab, style: ba9876543210"}
    esrgan = settings_from_a1111("x\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, Denoising "
                                 "strength: 0.4, Hires upscale: 2, Hires steps: 0, Hires upscaler: R-ESRGAN 4x+")
    assert (esrgan.options.hires_scale, esrgan.options.strength) == (None, None)  # another upscaler: not ours
    assert esrgan.ignored == {"Denoising strength": "0.4", "Hires upscale": "2", "Hires steps": "0",
                              "Hires upscaler": "R-ESRGAN 4x+"}

    img2img = settings_from_a1111("x\nNegative prompt: \nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG "
                                  "scale: 7, Seed: 3, Size: 64x64, Denoising strength: 0.6, Eta: 0.5, CFG Rescale: 0.7")
    o = img2img.options
    assert (o.strength, o.eta, o.guidance_rescale, o.negative_prompt) == (0.6, 0.5, 0.7, "")
    ddim = settings_from_a1111("x\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 3, Size: 64x64, Eta DDIM: 0.2")
    assert (ddim.options.sampler, ddim.options.spacing, ddim.options.eta) == ("ddim", "leading", 0.2)
    euler = settings_from_a1111("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, Eta: 0.5")
    assert euler.options.eta is None and euler.ignored == {"Eta": "0.5"}  # Euler has no noise to scale

    with pytest.raises(ValueError, match="sampler 'DPM2 a' is not implemented here; the nearest is 'euler_a'"):
        settings_from_a1111("x\nSteps: 20, Sampler: DPM2 a, CFG scale: 7, Seed: 3, Size: 64x64")
    with pytest.raises(ValueError, match=r"Seed must be an integer \(got 'abc'\)"):
        settings_from_a1111("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: abc, Size: 64x64")


def test_our_parameters_read_back_with_our_parser_too():
    info = {"prompt": "a, b: c", "negative_prompt": "d\ne", "steps": 9, "cfg": 3.5, "sampler": "dpmpp_2m_sde",
            "spacing": "exponential", "seed": 123, "width": 40, "height": 48, "strength": 0.25, "eta": 0.5,
            "guidance_rescale": 0.2}
    o = settings_from_a1111(a1111_parameters(info, {"name": "m:1", "sha256": "ab" * 32})).options
    assert {k: v for k, v in o.to_dict().items() if k in info} == info


def test_txt2img_from_png_reuses_the_recorded_model_and_flags_win(tmp_path, tiny_pipe, capsys):
    model = tiny_pipe.save(tmp_path / "tiny.safetensors")
    first = tmp_path / "first"
    assert txt2img.main(["--ckpt", str(model), "--prompt", "a red, circle", "--negative-prompt", "blue", "--steps",
                         "3", "--seed", "21", "--sampler", "DPM++ 2M SDE", "--cfg", "6", "--device", "cpu",
                         "--out", str(first)]) == 0
    made = first / "00000-21.png"
    recorded = read_png_settings(made)
    assert recorded.model["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert f"Model hash: {recorded.model['sha256'][:10]}, Model: tiny" in Image.open(made).text["parameters"]
    capsys.readouterr()

    assert txt2img.main(["--from-png", str(made), "--device", "cpu", "--out", str(tmp_path / "again")]) == 0
    assert f"note: using model {model}, which {made} records" in capsys.readouterr().err
    assert Image.open(tmp_path / "again" / "00000-21.png").tobytes() == Image.open(made).tobytes()

    assert txt2img.main(["--from-png", str(made), "--seed", "22", "--cfg", "2", "--device", "cpu",
                         "--out", str(tmp_path / "changed")]) == 0
    changed = read_png_settings(tmp_path / "changed" / "00000-22.png").options
    assert (changed.seed, changed.cfg) == (22, 2.0)
    assert changed.replace(seed=21, cfg=6.0) == recorded.options  # everything else from the PNG

    other = LDMPipeline.from_config(tiny_pipe.config, seed=3).save(tmp_path / "other.safetensors")
    capsys.readouterr()
    assert txt2img.main(["--from-png", str(made), "--ckpt", str(other), "--device", "cpu",
                         "--out", str(tmp_path / "other")]) == 0
    assert f"note: {made} was made with tiny (hash {recorded.model['sha256'][:10]}), not this model (other" in \
        capsys.readouterr().err


def test_loras_and_embeddings_are_recorded_and_applied_again(tmp_path, tiny_pipe, capsys):
    model = tiny_pipe.save(tmp_path / "tiny.safetensors")
    lora = save_lora(tmp_path / "my, style.safetensors", random_lora(tiny_pipe, 9).weights(), tiny_pipe.model_config)
    emb = tmp_path / "shiny.safetensors"
    save_file({"emb_params": torch.randn(2, tiny_pipe.text_encoder.cfg.width)}, str(emb))
    first = tmp_path / "first"
    assert txt2img.main(["--ckpt", str(model), "--lora", f"{lora}:0.7", "--embedding", str(emb), "--prompt",
                         "a shiny circle", "--steps", "2", "--seed", "8", "--device", "cpu", "--out", str(first)]) == 0
    made = first / "00000-8.png"
    lora_sha = hashlib.sha256(lora.read_bytes()).hexdigest()
    assert reference_parse(Image.open(made).text["parameters"])["Lora hashes"] == f"my style: {lora_sha[:12]}"
    recorded = read_png_settings(made).model
    assert recorded["loras"] == [{"name": "my, style", "path": str(lora), "scale": 0.7, "sha256": lora_sha}]
    assert recorded["embeddings"] == [{"token": "shiny", "path": str(emb),
                                       "sha256": hashlib.sha256(emb.read_bytes()).hexdigest()}]
    capsys.readouterr()
    assert txt2img.main(["--from-png", str(made), "--device", "cpu", "--out", str(tmp_path / "again")]) == 0
    assert "LoRA 'my, style'" in capsys.readouterr().err
    assert Image.open(tmp_path / "again" / "00000-8.png").tobytes() == Image.open(made).tobytes()
    lora.unlink()
    assert txt2img.main(["--from-png", str(made), "--device", "cpu", "--out", str(tmp_path / "without")]) == 0
    assert "was made with LoRA my, style at 0.7" in capsys.readouterr().err


def test_txt2img_from_an_a1111_png(tmp_path, capsys):
    meta = PngInfo()
    meta.add_text("parameters", "a green triangle\nNegative prompt: red\nSteps: 2, Sampler: DPM++ 2M, Schedule type: "
                                "Karras, CFG scale: 5, Seed: 11, Size: 32x32, Model hash: 0123456789, Model: sd15, "
                                "Clip skip: 2")
    Image.new("RGB", (32, 32)).save(tmp_path / "a1111.png", pnginfo=meta)
    assert txt2img.main(["--from-png", str(tmp_path / "a1111.png"), *TINY_ARGS, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "also says Clip skip: 2; these have no equivalent here and are not used" in err
    assert "was made by AUTOMATIC1111: same settings" in err
    o = read_png_settings(tmp_path / "o" / "00000-11.png").options
    assert (o.prompt, o.negative_prompt, o.steps, o.sampler, o.spacing, o.cfg, o.width, o.height) == (
        "a green triangle", "red", 2, "dpmpp_2m", "karras", 5.0, 32, 32)


def test_pngs_without_settings_are_named(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match=r"a.jpg is a JPEG image, not a PNG"):
        read_png_settings(tmp_path / "a.jpg")
    meta = PngInfo()
    meta.add_text("Software", "paint")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png", pnginfo=meta)
    with pytest.raises(ValueError, match=r"plain.png records no generation settings: no 'ldm' or 'parameters' text "
                                         r"chunk \(it has Software\)"):
        read_png_settings(tmp_path / "plain.png")
    for text, why in (("{not json", "Expecting property name"), ('{"format": 2, "options": {}}', "settings format 2"),
                      ('{"format": 1, "options": {"stepz": 3}}', "unknown sampling options: stepz")):
        meta = PngInfo()
        meta.add_text("ldm", text)
        Image.new("RGB", (8, 8)).save(tmp_path / "bad.png", pnginfo=meta)
        with pytest.raises(ValueError, match=rf"bad.png: its 'ldm' settings chunk is not readable \({why}"):
            read_png_settings(tmp_path / "bad.png")
    meta = PngInfo()
    meta.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    meta.add_text("workflow", "{}")
    Image.new("RGB", (8, 8)).save(tmp_path / "comfy.png", pnginfo=meta)
    with pytest.raises(ValueError, match=r"\(it has prompt, workflow\); it is a ComfyUI image, whose settings are a "
                                         r"node graph: give its KSampler's values as flags"):
        read_png_settings(tmp_path / "comfy.png")
    with pytest.raises(ValueError, match="image file not found"):
        read_png_settings(tmp_path / "missing.png")
