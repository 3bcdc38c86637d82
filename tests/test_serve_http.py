"""The server on a real socket (uvicorn on 127.0.0.1): a client that disconnects gives its place in
the queue back; a full queue answers 429 with Retry-After; progress per request with a live
preview; interrupting one request hands back its picture so far; the API key guards every route;
and ldm-serve refuses a non-local address without a key."""

import base64
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from ldm.serve import create_app
from ldm.serve.guard import presented_key
from ldm.cli.serve import is_loopback, main
from ldm.png_settings import settings_from_chunks
from serve_helpers import decode_png, make_server, running, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST and return the open socket without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_a_client_that_disconnects_frees_its_slot():
    server = make_server(max_batch=1, max_queue=2, start=False)
    with running(server) as url:
        gone = raw_post(url, "/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 2, "force_task_id": "gone"})
        wait_until(lambda: server.queue.get("gone") is not None, what="the request to be queued")
        with httpx.Client(base_url=url) as c:
            assert c.post("/sdapi/v1/txt2img", json={"prompt": "y"}).status_code == 429  # 2 pictures wait already
            gone.close()
            wait_until(lambda: server.queue.status()["queued_images"] == 0, what="the slot to be freed")
            assert server.queue.get("gone") is None
            server.start()
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "y", "batch_size": 2, "steps": 3}, timeout=120)
    assert r.status_code == 200 and len(r.json()["images"]) == 2


def test_a_full_queue_answers_429_with_retry_after_and_keeps_the_rest():
    server = make_server(max_batch=1, max_queue=3, start=False)
    with running(server) as url, httpx.Client(base_url=url, timeout=120) as c:
        answers = []
        waiting = [threading.Thread(target=lambda i=i: answers.append(
            c.post("/sdapi/v1/txt2img", json={"prompt": "p", "seed": i, "steps": 2}).status_code)) for i in range(3)]
        for t in waiting:
            t.start()
        wait_until(lambda: server.queue.status()["queued_images"] == 3, what="three queued requests")
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "one too many"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["detail"]
        server.start()
        for t in waiting:
            t.join(120)
    assert answers == [200, 200, 200]


def test_progress_per_request_with_preview_and_interrupt_returns_the_picture_so_far():
    server = make_server(max_batch=2, preview_every=0.0)
    with running(server) as url, httpx.Client(base_url=url, timeout=120) as c:
        answer = {}
        t = threading.Thread(target=lambda: answer.update(r=c.post("/sdapi/v1/txt2img", json={
            "prompt": "slow", "steps": 150, "force_task_id": "slow", "seed": 3})))
        t.start()
        wait_until(lambda: getattr(server.queue.get("slow"), "step", 0) >= 2, what="sampling to start")
        p = c.get("/sdapi/v1/progress", params={"task_id": "slow"}).json()
        assert p["state"]["job"] == "slow" and p["state"]["queue_position"] == 0
        assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 150 and p["eta_relative"] > 0
        wait_until(lambda: server.queue.get("slow").preview is not None, what="a preview")
        p = c.get("/sdapi/v1/progress", params={"task_id": "slow"}).json()
        assert decode_png(p["current_image"]).size == (32, 32)
        assert c.get("/sdapi/v1/progress").json()["state"]["job"] == "slow"  # A1111's form: the running job
        assert c.post("/sdapi/v1/interrupt", params={"task_id": "slow"}).status_code == 200
        t.join(60)
        r = answer["r"]
        # the answer is sent as the job ends; it leaves the queue's table right after
        wait_until(lambda: c.get("/sdapi/v1/progress", params={"task_id": "slow"}).json()["state"]["job_count"] == 0,
                   what="the finished job to leave the queue")
        gone = c.get("/sdapi/v1/progress", params={"task_id": "slow"}).json()
    info = json.loads(r.json()["info"])
    assert r.status_code == 200 and info["interrupted"] and len(r.json()["images"]) == 1
    assert settings_from_chunks(decode_png(r.json()["images"][0]).text).options.seed == 3
    assert gone["state"]["job_count"] == 0 and gone["textinfo"] == "unknown or finished task"


def test_the_api_key_guards_every_route():
    server = make_server(api_key="s3cret", start=False)
    app = create_app(server)
    paths = sorted({r.path for r in app.routes if "GET" in getattr(r, "methods", ())} | {"/static/app.js"})
    assert {"/", "/docs", "/openapi.json", "/sdapi/v1/progress", "/sdapi/v1/sd-models"} <= set(paths)
    basic = "Basic " + base64.b64encode(b"anyone:s3cret").decode()
    with TestClient(app) as c:
        for path in paths:
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            for headers in ({"Authorization": "Bearer s3cret"}, {"X-API-Key": "s3cret"}, {"Authorization": basic}):
                assert c.get(path, headers=headers).status_code == 200, (path, headers)
        for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/interrupt", "/sdapi/v1/options"):
            assert c.post(path, json={"prompt": "x"}).status_code == 401, path
    assert server.queue.status()["queued_images"] == 0


def test_presented_key_reads_every_form():
    assert presented_key({b"authorization": b"Bearer abc"}) == "abc"
    assert presented_key({b"x-api-key": b"abc"}) == "abc"
    assert presented_key({b"authorization": b"Basic " + base64.b64encode(b"u:p:q")}) == "p:q"
    assert presented_key({b"authorization": b"Basic !!!"}) is None
    assert presented_key({}) is None


def test_non_local_bind_needs_a_key(monkeypatch, capsys):
    monkeypatch.delenv("LDM_API_KEY", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    with pytest.raises(SystemExit, match="--api-key"):
        main(["--config", "configs/sd_tiny.yaml", "--host", "0.0.0.0"])


def test_requests_finish_in_time_under_concurrency():
    """Eight clients at once, each checking it got its own seed and prompt back."""
    server = make_server(max_batch=4)
    with running(server) as url:
        results = {}

        def client(i):
            with httpx.Client(base_url=url, timeout=120) as c:
                r = c.post("/sdapi/v1/txt2img", json={"prompt": f"client {i}", "seed": 100 + i, "steps": 3})
                results[i] = settings_from_chunks(decode_png(r.json()["images"][0]).text).options

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert time.monotonic() - start < 120
    assert {i: (r.prompt, r.seed) for i, r in results.items()} == {i: (f"client {i}", 100 + i) for i in range(8)}
