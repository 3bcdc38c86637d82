"""Shared by the server tests: a tiny model, a server around it, and a real uvicorn on loopback."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from pathlib import Path

from PIL import Image

from helpers import randomize
from ldm import LDMPipeline
from ldm.serve import Limits, ModelCatalog, Server, ServeSettings, create_app

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/configs/tiny64.yaml"
# The plumbing model of test_pipeline.py: 32 px, 3 steps, well under a second per picture.
FAST = ["model.unet.model_channels=32", "model.text_encoder.width=64", "model.unet.context_dim=64",
        "model.text_encoder.heads=2", "model.text_encoder.projection_dim=64", "model.vae.ch=16",
        "sample.height=32", "sample.width=32", "sample.steps=3"]


def tiny_pipeline(seed: int = 0) -> LDMPipeline:
    return randomize(LDMPipeline.from_config(TINY, FAST, seed=seed), seed=seed + 1)


def make_server(pipe: LDMPipeline | None = None, *, title: str = "tiny.safetensors", start: bool = True,
                **settings) -> Server:
    """A server of one tiny model (sizes up to 256 px, inputs up to 1 MP unless told); started unless start=False."""
    settings.setdefault("limits", Limits(max_size=256, max_input_pixels=1 << 20))
    server = Server(ModelCatalog.of_pipeline(pipe or tiny_pipeline(), title), ServeSettings(**settings))
    return server.start() if start else server


def png_base64(size=(32, 32), color="red", mode="RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(data)))
    assert im.format == "PNG"
    im.load()
    return im


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(server: Server):
    """Serve `server`'s app with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        web.should_exit = True
        thread.join(10)
        server.stop()


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
