"""Run by test_fsdp_training_matches_ddp under `accelerate launch --use_fsdp --num_processes 2`:
trains a tiny model with DDP into <out>/ddp, then with FSDP into <out>/fsdp, stopping at step
`until` and resuming from that state in a new trainer; writes, per rank, how much of the U-Net
that rank held while training with FSDP."""

import json
import os
import sys
from pathlib import Path

from helpers import SD_TINY  # this script's folder, tests/, is first on sys.path
from ldm.config import load_config
from ldm.train.fsdp import FSDP_ENV
from ldm.train.ldm_trainer import LDMTrainer

out, until, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
assert os.environ.get(FSDP_ENV) == "true", "launch with FSDP"

os.environ[FSDP_ENV] = "false"  # the same data and seed, with whole replicas
ddp = LDMTrainer(load_config(SD_TINY, [*overrides, f"train.output_dir={out / 'ddp'}"]))
assert not ddp.fsdp
ddp.train()

os.environ[FSDP_ENV] = "true"
cfg = [*overrides, f"train.output_dir={out / 'fsdp'}"]
first = LDMTrainer(load_config(SD_TINY, cfg))
first.train(until=until)
resumed = LDMTrainer(load_config(SD_TINY, cfg), resume=True)
resumed.train()
unet = resumed.unet
held = {
    "fsdp": resumed.fsdp,
    "step": resumed.step,
    "resumed_at": until,
    "local": sum(p.to_local().numel() for p in unet.parameters()),
    "total": sum(p.numel() for p in unet.parameters()),
    "ema_local": sum(v.to_local().numel() for v in resumed.ema["unet"].shadow.values() if hasattr(v, "to_local")),
}
rank = resumed.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps(held))
