"""Training on images this project did not make: the Tango icon theme (Debian's tango-icon-theme,
public domain; .ci/run installs it), captioned from its file names by tools/icons_to_folder.py,
trains both stages through tools/train_ldm.py (stage 1 included, no VAE given) and the export
generates through tools/txt2img.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT

TANGO = Path("/usr/share/icons/Tango")
# A narrower U-Net and text encoder than sd_tiny's, as in test_training_quality.py.
NARROW = [
    "model.unet.model_channels=32", "model.unet.num_head_channels=16", "model.unet.context_dim=64",
    "model.text_encoder.width=64", "model.text_encoder.heads=2", "model.text_encoder.projection_dim=64",
]

pytestmark = pytest.mark.skipif(
    not TANGO.is_dir() and not os.environ.get("CI"),  # CI installs it: there a missing theme fails
    reason="needs the Tango icons: apt-get install -y tango-icon-theme",
)


def run(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_icons_train_both_stages_through_the_tool_and_the_export_generates(tmp_path):
    folder = tmp_path / "tango"
    r = run("tools/icons_to_folder.py", "--theme", TANGO, "--out", folder)
    assert r.returncode == 0, r.stderr
    assert re.search(r"wrote 2\d\d captioned icons", r.stdout), r.stdout
    assert (folder / "status" / "weather-storm.txt").read_text() == "weather storm, status icon\n"
    assert Image.open(folder / "status" / "weather-storm.png").size == (32, 32)

    vae_yaml = tmp_path / "vae.yaml"
    vae_yaml.write_text(f"base: {ROOT / 'configs/vae_tiny.yaml'}\n"
                        f"train:\n  output_dir: {tmp_path / 'vae'}\n  steps: 4\n  batch_size: 8\n"
                        "  save_every: 4\n  sample_every: 0\n  log_with: none\n")
    r = run("tools/train_ldm.py", "configs/sd_tiny.yaml", *NARROW, "data.source=folder", f"data.urls={folder}",
            "data.heldout_fraction=0.1", "data.num_workers=0", f"train.vae_config={vae_yaml}",
            f"train.vae_checkpoint={tmp_path / 'vae' / 'vae.safetensors'}", f"train.output_dir={tmp_path / 'ldm'}",
            "train.steps=4", "train.warmup_steps=2", "train.batch_size=8", "train.save_every=4", "train.sample_every=0",
            "train.log_with=none", "train.mixed_precision='no'", "train.channels_last=false")
    assert r.returncode == 0, r.stderr[-3000:]
    # The log says which data each stage read: the icons, for both (no fallback to the built-in shapes).
    reads = re.findall(r"(vae|ldm): reads data.source=folder data.urls=(\S+) \((\d+) captioned images, (\d+) held out\)",
                       r.stdout)
    assert [(stage, url) for stage, url, _, _ in reads] == [("vae", str(folder)), ("ldm", str(folder))], r.stdout
    images, held = int(reads[0][2]), int(reads[0][3])
    assert images > 200 and 10 <= held <= 40
    vae_metrics = json.loads((tmp_path / "vae" / "metrics.json").read_text())
    assert vae_metrics["heldout_size"] == held and vae_metrics["psnr"] > 5  # measured on held-out icons
    ldm_metrics = json.loads((tmp_path / "ldm" / "metrics.json").read_text())
    assert ldm_metrics["heldout_size"] == held and ldm_metrics["steps"] == 4
    assert ldm_metrics["heldout_loss"] < ldm_metrics["heldout_loss_start"]

    model = tmp_path / "ldm" / "model.safetensors"
    r = run("tools/txt2img.py", "--ckpt", model, "--prompt", "weather storm, status icon", "--n", "2", "--steps", "2",
            "--seed", "1", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "out" / "00000-1.png").size == (32, 32)
