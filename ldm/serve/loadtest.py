"""The load bench behind `tools/bench_serve.py`: concurrent clients against servers on loopback.

Two server processes (`ldm-serve`) serve the same model, one batching (`--max-batch N`) and
one not (`--max-batch 1`). Rounds alternate between them, so both see the same background load on
a shared machine; the ratio of their throughputs is the number to read. Every client sends one
request at a time with a prompt and seed of its own, and checks that the answer is one PNG
carrying exactly that prompt and seed: a lost request (an error or a timeout) or an answer meant
for another request counts against the server. Counts and durations are bounded; only 127.0.0.1
is ever contacted.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
from PIL import Image

from ..png_settings import settings_from_chunks



@dataclass
class Tally:
    """What the clients of one server saw."""

    latencies: list[float] = field(default_factory=list)  # seconds per answered request
    seconds: float = 0.0  # wall time under load
    lost: int = 0  # errors and timeouts
    mixed: int = 0  # answers carrying another request's prompt or seed

    @property
    def images_per_second(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class ServerProcess:
    """`ldm-serve` with the given arguments on 127.0.0.1 and a free port, until `stop`."""

    def __init__(self, args: list[str], *, timeout: float = 600.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "ldm.cli.serve", *args, "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()[-2000:]}")
            try:
                httpx.get(self.url + "/sdapi/v1/options", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the server did not answer within {timeout:.0f} s") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def load(url: str, *, clients: int, duration: float, max_requests: int, body: dict, tag: str,
         timeout: float = 600.0) -> Tally:
    """`clients` clients, each sending requests one after another until `duration` seconds have
    passed or it has sent `max_requests`; every answer checked against its request."""
    tally, lock = Tally(), threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            for r in range(max_requests):
                if r and time.monotonic() - start > duration:
                    return
                prompt, seed = f"{tag} client {c} request {r}", 1_000_000 * c + r
                t0 = time.monotonic()
                try:
                    answer = http.post("/sdapi/v1/txt2img", json=body | {"prompt": prompt, "seed": seed})
                    answer.raise_for_status()
                    ok = _answer_matches(answer.json(), prompt, seed)
                except (httpx.HTTPError, ValueError, KeyError):
                    with lock:
                        tally.lost += 1
                    continue
                with lock:
                    if ok:
                        tally.latencies.append(time.monotonic() - t0)
                    else:
                        tally.mixed += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.seconds = time.monotonic() - start
    return tally


def _answer_matches(body: dict, prompt: str, seed: int) -> bool:
    """One PNG whose text chunks and info name exactly this request's prompt and seed."""
    info = json.loads(body["info"])
    (image,) = body["images"]
    png = Image.open(io.BytesIO(base64.b64decode(image)))
    if png.format != "PNG":
        return False
    try:
        recorded = settings_from_chunks(png.text).options
    except ValueError:  # no settings in the picture
        return False
    return (recorded.prompt == prompt and recorded.seed == seed
            and info["all_seeds"] == [seed] and info["all_prompts"] == [prompt])


def merge(tallies: list[Tally]) -> Tally:
    out = Tally()
    for t in tallies:
        out.latencies += t.latencies
        out.seconds += t.seconds
        out.lost += t.lost
        out.mixed += t.mixed
    return out


def report(results: dict[str, Tally]) -> str:
    """A table of the modes and, with both, the ratio of their throughputs."""
    lines = [f"{'mode':<14} {'answered':>8} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'lost':>5} {'mixed up':>8}"]
    for mode, t in results.items():
        lines.append(f"{mode:<14} {len(t.latencies):>8} {t.images_per_second:>9.3f} {t.percentile(0.5):>7.2f} "
                     f"{t.percentile(0.95):>7.2f} {t.lost:>5} {t.mixed:>8}")
    on, off = results.get("batching on"), results.get("batching off")
    if on and off and off.images_per_second:
        lines.append(f"batching on / off: {on.images_per_second / off.images_per_second:.2f}x images/s")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
