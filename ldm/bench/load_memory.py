"""Peak memory of loading a full-size Stable Diffusion single-file checkpoint, measured in a fresh process.

`write_checkpoint` writes an SD-layout checkpoint with random weights (network weights, schedule
buffers and the CLIP position_ids, as in the public files); `measure` loads it with
`LDMPipeline.load` in a fresh Python process and reads that process's peak resident
memory (VmHWM, Linux), after loading and after every weight was read once.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import PREFIXES
from ..config import load_config
from ..diffusion.schedule import Schedule
from ..models import build_models

CHILD = r"""
import json, sys, time
def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import torch, transformers
from ldm.pipeline import LDMPipeline
start = time.perf_counter()
result = {"dtype": None}
if sys.argv[1] != "-":
    pipe = LDMPipeline.load(sys.argv[1])
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
    saved, so the writer holds one copy of the weights. Returns the file's size in bytes."""
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
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, "global_step": 0}, path)
    del tensors
    gc.collect()
    return path.stat().st_size


def measure(path: Path | None) -> dict:
    """Load `path` (None: only import the library) in a fresh process; its peak RSS in kB and load time."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path) if path else "-"],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"loading failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])
