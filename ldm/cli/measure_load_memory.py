"""Peak memory of loading a full-size Stable Diffusion single-file checkpoint (see ldm/bench/load_memory.py).

Writes an SD 1.5-layout checkpoint with random weights to a temporary directory (or takes your model
with --ckpt), loads it with `LDMPipeline.load` in a fresh Python process and reads that process's
peak resident memory. A process that only imports the library is measured too, so the load's own
cost shows. Needs about 2x the checkpoint size in free RAM and disk.

    ldm-measure-load-memory                                   # fp16 and fp32, .safetensors and .ckpt
    ldm-measure-load-memory --dtype fp16 --format safetensors
    ldm-measure-load-memory --ckpt v1-5-pruned-emaonly.safetensors   # a model you have (any format)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

from ..bench.load_memory import measure, write_checkpoint
from ..devices import DTYPES
from .common import run_main

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd15", help="config YAML or a shipped config's name (default sd15)")
    parser.add_argument("--dtype", nargs="+", default=["fp16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--format", nargs="+", default=["safetensors", "ckpt"], choices=["safetensors", "ckpt"])
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--ckpt", type=Path, default=None, metavar="MODEL",
                        help="measure loading this model (any format) instead of random checkpoints")
    args = parser.parse_args(argv)
    if args.ckpt is not None and not args.ckpt.exists():
        raise ValueError(f"model not found: {args.ckpt}")

    base = measure(None)
    print(f"baseline (python + torch + transformers + ldm imported): peak RSS {base['peak_kb'] * 1024 / GIB:.2f} GiB")
    print("peak RSS of a fresh process: after LDMPipeline.load returns / after every weight was read once")
    print(f"{'file':<28} {'size':>9} {'loaded':>9} {'ratio':>6} {'all read':>9} {'ratio':>6} {'time':>6}")
    if args.ckpt is not None:
        files = [args.ckpt] if args.ckpt.is_file() else [p for p in args.ckpt.rglob("*") if p.is_file()]
        _row(args.ckpt, sum(p.stat().st_size for p in files), measure(args.ckpt))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for dt in args.dtype:
            for fmt in args.format:
                path = Path(tmp) / f"sd15-random-{dt}.{fmt}"
                size = write_checkpoint(path, args.config, DTYPES[dt])
                _row(path, size, measure(path))
                path.unlink()
    return 0


def _row(path: Path, size: int, r: dict) -> None:
    loaded, peak = r["loaded_kb"] * 1024, r["peak_kb"] * 1024
    print(
        f"{path.name:<28} {size / GIB:>7.2f}Gi {loaded / GIB:>7.2f}Gi {loaded / size:>6.2f} "
        f"{peak / GIB:>7.2f}Gi {peak / size:>6.2f} {r['seconds']:>5.1f}s  ({r['dtype']})"
    )


run = partial(run_main, main)  # the ldm-measure-load-memory entry point

if __name__ == "__main__":
    sys.exit(run())
