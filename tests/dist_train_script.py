"""Run by test_two_process_training under `accelerate launch --cpu --num_processes 2`: trains a
tiny model (or a LoRA on one, with train.lora.rank) and writes, per rank, a digest of its final
weights and the captions it trained on."""

import hashlib
import json
import sys
from pathlib import Path

from helpers import SD_TINY  # this script's folder, tests/, is first on sys.path
from ldm.config import load_config
from ldm.data.batches import Batches
from ldm.train.ldm_trainer import LDMTrainer
from ldm.train.lora_trainer import LoRATrainer

out, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = load_config(SD_TINY, overrides)
trainer = (LoRATrainer if cfg.train.lora.rank else LDMTrainer)(cfg)
seen = []
original = trainer.batches


def recording():
    batches = original()

    def captions():
        for batch in batches:
            seen.extend(batch["caption"] if "caption" in batch else [])
            yield batch

    return Batches(batches.source, captions(), batches.loader)


trainer.batches = recording
trainer.train()
state = trainer.accelerator.unwrap_model(trainer.unet).state_dict()
digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
rank = trainer.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps({"digest": digest, "captions": seen, "steps": trainer.step}))
