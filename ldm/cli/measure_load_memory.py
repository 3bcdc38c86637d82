"""Peak memory of loading a full-size Stable Diffusion single-file checkpoint (see ldm/bench/load_memory.py).

Writes an SD 1.5-layout checkpoint with random weights to a temporary directory, loads it with
`LDMPipeline.from_single_file` in a fresh Python process and reads that process's peak resident
memory. A process that only imports the library is measured too, so the load's own cost shows.
Needs about 2x the checkpoint size in free RAM and disk.

    ldm-measure-load-memory                                   # fp16 and fp32, .safetensors and .ckpt
    ldm-measure-load-memory --dtype fp16 --format safetensors
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd15", help="config YAML or a shipped config's name (default sd15)")
    parser.add_argument("--dtype", nargs="+", default=["fp16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--format", nargs="+", default=["safetensors", "ckpt"], choices=["safetensors", "ckpt"])
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    args = parser.parse_args(argv)

    base = measure(None)
    gib = 2**30
    print(f"baseline (python + torch + transformers + ldm imported): peak RSS {base['peak_kb'] * 1024 / gib:.2f} GiB")
    print("peak RSS of a fresh process: after from_single_file returns / after every weight was read once")
    print(f"{'file':<28} {'size':>9} {'loaded':>9} {'ratio':>6} {'all read':>9} {'ratio':>6} {'time':>6}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for dt in args.dtype:
            for fmt in args.format:
                path = Path(tmp) / f"sd15-random-{dt}.{fmt}"
                size = write_checkpoint(path, args.config, DTYPES[dt])
                r = measure(path)
                loaded, peak = r["loaded_kb"] * 1024, r["peak_kb"] * 1024
                print(
                    f"{path.name:<28} {size / gib:>7.2f}Gi {loaded / gib:>7.2f}Gi {loaded / size:>6.2f} "
                    f"{peak / gib:>7.2f}Gi {peak / size:>6.2f} {r['seconds']:>5.1f}s  ({r['dtype']})"
                )
                path.unlink()
    return 0


run = partial(run_main, main)  # the ldm-measure-load-memory entry point

if __name__ == "__main__":
    sys.exit(run())
