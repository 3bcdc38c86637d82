"""Peak memory of loading a full-size Stable Diffusion single-file checkpoint.

Writes an SD 1.5-layout checkpoint with random weights (network weights, schedule buffers and the
CLIP position_ids, as in the public files) to a temporary directory, then loads it with
`ldm.convert.load_single_file` in a fresh Python process and reads that process's peak resident
memory (VmHWM). A process that only imports the library is measured too, so the load's own cost
shows. Needs about 2x the checkpoint size in free RAM and disk.

    python tools/measure_load_memory.py                       # fp16 and fp32, .safetensors and .ckpt
    python tools/measure_load_memory.py --dtype fp16 --format safetensors
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm.checkpoint import PREFIXES  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.diffusion.schedule import Schedule  # noqa: E402
from ldm.models import build_models  # noqa: E402

CHILD = r"""
import json, sys, time
def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import torch, transformers
import ldm.pipeline
from ldm.convert import load_single_file
start = time.perf_counter()
result = {"dtype": None}
if sys.argv[1] != "-":
    pipe = load_single_file(sys.argv[1])
    result.update(dtype=str(pipe.dtype), seconds=time.perf_counter() - start, loaded_kb=peak_kb())
    # memory-mapped weights are read from disk when first used: touch every one, as inference does
    with torch.no_grad():
        for module in pipe.modules.values():
            for t in module.state_dict().values():
                t.sum()
result["peak_kb"] = peak_kb()
print(json.dumps(result))
"""


def write_checkpoint(path: Path, config: str, dtype: torch.dtype) -> int:
    """Random weights in the original layout; tensors are created one by one into the dict that is
    saved, so the writer holds one copy of the weights."""
    cfg = load_config(config).model
    with torch.device("meta"):
        unet, vae, text = build_models(cfg)
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        for key, meta in module.state_dict().items():
            tensors[PREFIXES[name] + key] = torch.empty(meta.shape, dtype=dtype).normal_(0, 0.02, generator=g)
    del unet, vae, text
    schedule = Schedule.from_config(cfg.diffusion)
    tensors["betas"] = schedule.betas.to(dtype)
    tensors["alphas_cumprod"] = schedule.alphas_cumprod.to(dtype)
    if cfg.text_encoder.kind == "hf_clip":
        ids = torch.arange(cfg.text_encoder.context_length)[None]
        tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = ids
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, "global_step": 0}, path)
    del tensors
    gc.collect()
    return path.stat().st_size


def measure(path: Path | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path) if path else "-"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    if out.returncode:
        raise SystemExit(f"loading failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "sd15.yaml"))
    ap.add_argument("--dtype", nargs="+", default=["fp16", "fp32"], choices=["fp16", "fp32", "bf16"])
    ap.add_argument("--format", nargs="+", default=["safetensors", "ckpt"], choices=["safetensors", "ckpt"])
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    args = ap.parse_args()
    dtypes = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}

    base = measure(None)
    gib = 2**30
    print(f"baseline (python + torch + transformers + ldm imported): peak RSS {base['peak_kb'] * 1024 / gib:.2f} GiB")
    print("peak RSS of a fresh process: after load_single_file returns / after every weight was read once")
    print(f"{'file':<28} {'size':>9} {'loaded':>9} {'ratio':>6} {'all read':>9} {'ratio':>6} {'time':>6}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for dt in args.dtype:
            for fmt in args.format:
                path = Path(tmp) / f"sd15-random-{dt}.{fmt}"
                size = write_checkpoint(path, args.config, dtypes[dt])
                r = measure(path)
                loaded, peak = r["loaded_kb"] * 1024, r["peak_kb"] * 1024
                print(
                    f"{path.name:<28} {size / gib:>7.2f}Gi {loaded / gib:>7.2f}Gi {loaded / size:>6.2f} "
                    f"{peak / gib:>7.2f}Gi {peak / size:>6.2f} {r['seconds']:>5.1f}s  ({r['dtype']})"
                )
                path.unlink()


if __name__ == "__main__":
    main()
