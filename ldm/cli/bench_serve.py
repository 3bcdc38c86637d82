"""Load bench of the server: N concurrent clients on loopback, batching on against batching off.

    python tools/bench_serve.py                                   # sd_tiny (random weights), 8 clients
    python tools/bench_serve.py --clients 8 --rounds 3 --duration 60 --threads 2
    python tools/bench_serve.py --ckpt runs/sd_tiny/model.safetensors --steps 20

Starts two servers (ldm-serve) with the same model, one with --max-batch N and one with
--max-batch 1, and alternates rounds of load between them. Prints images/s, p50/p95 latency and
lost or mixed-up answers (each answer's prompt and seed are checked) per mode, and their ratio.
See docs/serve.md.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from ..serve.loadtest import ServerProcess, load, merge, report
from .common import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", default="configs/sd_tiny.yaml", help="model with random weights (default sd_tiny)")
    source.add_argument("--ckpt", default=None, help="a model file instead of --config")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode, alternating (default 2)")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of load per round (default 45)")
    parser.add_argument("--max-requests", type=int, default=100, help="requests per client per round at most")
    parser.add_argument("--max-batch", type=int, default=8, help="batch limit of the batching server (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per request (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server (default 2)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if min(args.clients, args.rounds, args.max_requests, args.max_batch, args.steps) < 1 or args.duration <= 0:
        raise SystemExit("error: counts and --duration must be positive")

    model = ["--ckpt", args.ckpt] if args.ckpt else ["--config", args.config]
    common = [*model, "--device", args.device, "--threads", str(args.threads), "--max-queue", str(4 * args.clients)]
    modes = {"batching on": args.max_batch, "batching off": 1}
    servers = {}
    try:
        for mode, batch in modes.items():
            print(f"starting the server with {mode} (--max-batch {batch}) ...", file=sys.stderr)
            servers[mode] = ServerProcess([*common, "--max-batch", str(batch)])
        body = {"steps": args.steps, "batch_size": 1}
        for mode, server in servers.items():  # warm-up, not counted
            load(server.url, clients=1, duration=0, max_requests=1, body=body, tag="warm-up")
        rounds: dict[str, list] = {mode: [] for mode in modes}
        for r in range(args.rounds):
            for mode, server in servers.items():
                tally = load(server.url, clients=args.clients, duration=args.duration,
                             max_requests=args.max_requests, body=body, tag=f"round {r} {mode}")
                rounds[mode].append(tally)
                print(f"round {r + 1}, {mode}: {len(tally.latencies)} images in {tally.seconds:.1f} s "
                      f"({tally.images_per_second:.3f}/s), lost {tally.lost}, mixed up {tally.mixed}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    print(f"{args.clients} clients, {args.steps} steps, {args.rounds} rounds of {args.duration:.0f} s per mode, "
          f"{args.threads} threads per server, {args.ckpt or args.config}")
    results = {mode: merge(tallies) for mode, tallies in rounds.items()}
    print(report(results))
    return 1 if any(t.lost or t.mixed for t in results.values()) else 0


run = partial(run_main, main)  # the ldm-bench-serve entry point

if __name__ == "__main__":
    sys.exit(run())
