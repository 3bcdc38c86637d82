"""Benchmark a model (random weights) per workload: median time, it/s or img/s, FLOPs, TFLOP/s, MFU, peak memory.

    ldm-bench --config sd15 --vs-diffusers                       # all workloads, against diffusers
    ldm-bench --config sd15 --workloads unet,generate --channels-last --compile max-autotune
    ldm-bench --config configs/sd_tiny.yaml --device cpu --resolution 64 --json bench.json
    ldm-bench --ckpt v1-5-pruned-emaonly.safetensors --workloads unet,generate   # a model file's own weights

Workloads: unet (one CFG step, batch 2), train (one training step per --train-resolution/--train-batch),
vae (decode of one image), generate (LDMPipeline.generate of one image per --steps, DDIM with CFG),
data (the data loaders alone). See docs/performance.md. The table goes to stdout, progress to stderr.
A row that fails (a disagreement with diffusers, out of memory, a model diffusers cannot run) is
printed as failed with its reason, the others still run, and the exit code is 1. --json is
rewritten after every row, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from ..atomic import write_text_atomic
from ..bench import WORKLOADS, BenchOptions, BenchResult, format_table, run_bench
from ..bench.profile import format_profile
from ..config import COMPILE_MODES
from ..devices import DTYPES
from .common import run_main
from .model_choice import default_model


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 256,512 (got {text!r})") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def train_shapes(resolutions: list[int] | None, batches: list[int] | None) -> list[tuple[int, int]] | None:
    """Pair --train-resolution with --train-batch (one batch applies to every resolution)."""
    if resolutions is None and batches is None:
        return None
    if resolutions is None or batches is None:
        raise ValueError("pass --train-resolution and --train-batch together, e.g. --train-resolution 256,512 "
                         "--train-batch 64,16")
    if len(batches) == 1:
        batches = batches * len(resolutions)
    if len(batches) != len(resolutions):
        raise ValueError(f"got {len(resolutions)} training resolutions and {len(batches)} batch sizes; "
                         "pass one batch size, or one per resolution")
    return list(zip(resolutions, batches))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", default=None,
                        help="config YAML path, or a name in configs/ (sd15, sd21, sd_small, sd_tiny, ...), built "
                             "with random weights")
    source.add_argument("--ckpt", default=None, metavar="MODEL",
                        help="a model file or diffusers folder in any format, with its own weights (default without "
                             "--config: $LDM_CHECKPOINT, else runs/sd_tiny/model.safetensors)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set model.unet.transformer_depth=2 (repeatable)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, or auto (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="inference weights and training autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--resolution", type=int, default=512, help="image side for unet, vae, generate (default 512)")
    parser.add_argument("--train-resolution", type=int_list, default=None, metavar="PX[,PX]",
                        help="training image sides (default: 256,512 on CUDA, 64 on CPU)")
    parser.add_argument("--train-batch", type=int_list, default=None, metavar="N[,N]",
                        help="training batch per resolution (default: 64,16 on CUDA, 4 on CPU)")
    parser.add_argument("--steps", type=int_list, default=[30, 50], metavar="N[,N]",
                        help="DDIM steps of the generate workload (default 30,50)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row, median reported (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    speed = parser.add_argument_group("speed switches (ldm.speed; see docs/sampling.md#speed-switches)")
    speed.add_argument("--channels-last", action="store_true", help="NHWC activations and weights")
    speed.add_argument("--fuse-qkv", action="store_true", help="one matmul for the self-attention q, k, v")
    speed.add_argument("--fused-norm-act", action="store_true", help="GroupNorm and SiLU in one kernel")
    speed.add_argument("--compile", default=None, choices=COMPILE_MODES, metavar="MODE",
                       help=f"torch.compile mode, one of {', '.join(COMPILE_MODES)} (diffusers is compiled alike)")
    speed.add_argument("--cuda-graphs", action="store_true", help="replay inference through CUDA graphs")
    parser.add_argument("--vs-diffusers", action="store_true",
                        help="also time diffusers on the same weights (checked to agree first); needs "
                             'pip install -e ".[bench]"')
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: the data sheet's for known GPUs, none on CPU); "
                             "790 puts an H100 on the scale of the published SD 1.5 MFUs")
    parser.add_argument("--data-workers", type=int, default=4, help="loader workers of the data workload (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one CFG U-Net step (torch.profiler; ours and, with --vs-diffusers, "
                             "diffusers') and print the top kernels")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    ckpt = args.ckpt
    if ckpt is None and args.config is None:
        ckpt, why = default_model()
        print(f"note: benchmarking the {why}", file=sys.stderr)

    switches = {"channels_last": args.channels_last, "fuse_qkv": args.fuse_qkv, "fused_norm_act": args.fused_norm_act,
                "compile": args.compile, "cuda_graphs": args.cuda_graphs}
    options = BenchOptions(
        config=args.config, ckpt=ckpt, overrides=args.overrides, device=args.device, dtype=args.dtype,
        resolution=args.resolution, train_shapes=train_shapes(args.train_resolution, args.train_batch),
        generate_steps=args.steps, repeats=args.repeats, warmup=args.warmup,
        workloads=[w.strip() for w in args.workloads.split(",") if w.strip()],
        speed={k: v for k, v in switches.items() if v}, vs_diffusers=args.vs_diffusers,
        peak_tflops=args.peak_tflops, data_workers=args.data_workers, seed=args.seed, profile=args.profile,
    )
    def save(result: BenchResult) -> None:  # after every row, so a run stopped early keeps what it measured
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(args.json), json.dumps(result.to_dict(), indent=2) + "\n")

    result = run_bench(options, log=lambda line: print(line, file=sys.stderr, flush=True), on_row=save)
    save(result)
    print(format_table(result))
    if result.profile is not None:
        print(result.profile["error"] if "error" in result.profile else format_profile(result.profile))
    if args.json:
        print(f"wrote {args.json}")
    if result.failures:
        print(f"error: {len(result.failures)} of {len(result.rows)} rows failed (reasons under the table)",
              file=sys.stderr)
        return 1
    return 0


run = partial(run_main, main)  # the ldm-bench entry point

if __name__ == "__main__":
    sys.exit(run())
