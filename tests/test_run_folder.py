"""The output-folder contract of the trainers (ldm/train/folder.py): one run owns a folder, a new
run never mixes with or deletes an old one, --resume continues the same run or says why not, and
a disk that cannot take a save says so."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from helpers import CONFIGS, ROOT, SD_TINY
from ldm.atomic import DiskError
from ldm.config import load_config, to_dict
from ldm.errors import CheckpointError, ConfigError
from ldm.train.checkpoint import find_latest_state, load_training_state, save_training_state
from ldm.train.folder import FolderLock, RunFolder, RunFolderError, config_changes
from ldm.train.ldm_trainer import LDMTrainer
from ldm.train.stages import train_stages
from ldm.train.vae_trainer import VAETrainer

pytestmark = pytest.mark.usefixtures("one_thread")

# A VAE run of a few 16 px steps: the cheapest real trainer.
QUICK = ["model.vae.ch=16", "data.resolution=16", "data.heldout_size=4", "train.batch_size=2", "train.steps=2",
         "train.warmup_steps=1", "train.save_every=1", "train.sample_every=0", "train.log_with=none",
         "vae_loss.disc_start=100", "data.num_workers=0"]


def config(out, *extra):
    return load_config(CONFIGS / "vae_tiny.yaml", [*QUICK, f"train.output_dir={out}", *extra])


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished quick run (states, export, metrics), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    VAETrainer(config(out)).train()
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------------------------------------
# A new run never mixes with another
# ---------------------------------------------------------------------------------------------


def test_a_new_run_in_a_used_folder_refuses_and_changes_nothing(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    with pytest.raises(RunFolderError) as e:
        VAETrainer(config(out, "train.seed=1"))
    message = str(e.value)
    assert f"{out} holds another run (2 training states, newest state-00000002: step 2 of 2, seed 0" in message
    assert "vae.safetensors" in message and "metrics.json" in message
    assert "--resume" in message and f"--overwrite, which moves the old one to {out}.old-" in message
    assert snapshot(out) == before and not (out / ".lock").exists()


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    VAETrainer(config(out, "train.seed=1", "train.steps=1"), overwrite=True).train()
    (aside,) = tmp_path.glob("run.old-*")
    assert snapshot(aside) == before  # the old run, whole and untouched
    meta = json.loads((find_latest_state(out) / "meta.json").read_text())
    assert meta["step"] == 1 and json.loads((out / "metrics.json").read_text())["steps"] == 1
    assert sorted(p.name for p in out.glob("state-*")) == ["state-00000001"]  # nothing of the old run here


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(RunFolderError, match="pass one of them"):
        RunFolder(tmp_path, "vae", "vae.safetensors").open(resume=True, overwrite=True)


# ---------------------------------------------------------------------------------------------
# --resume continues the same run, or says why not
# ---------------------------------------------------------------------------------------------


def test_resume_never_starts_from_zero(tmp_path):
    with pytest.raises(RunFolderError, match=r"--resume: no training state to continue in .*typo; check "
                                             r"train.output_dir, or drop --resume"):
        VAETrainer(config(tmp_path / "typo"), resume=True)
    (tmp_path / "damaged" / "state-00000004").mkdir(parents=True)  # no meta.json
    with pytest.raises(RunFolderError, match=r"state-00000004: incomplete, no meta.json"):
        VAETrainer(config(tmp_path / "damaged"), resume=True)
    assert (tmp_path / "damaged" / "state-00000004").is_dir()  # kept, never replaced


def test_resume_refuses_a_changed_config_and_lists_the_changes(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    with pytest.raises(RunFolderError) as e:
        VAETrainer(config(out, "train.seed=1", "train.lr=0.01", "train.steps=3"), resume=True)
    message = str(e.value)
    for line in ("train.seed: 0 in the state, 1 now", "train.lr: 0.001 in the state, 0.01 now",
                 "train.steps: 2 in the state, 3 now"):
        assert line in message
    assert "--resume-with-changes" in message and snapshot(out) == before
    # Settings that do not change the weights may differ; a deliberate change goes on with a note.
    trainer = VAETrainer(config(out, "train.steps=3", "train.log_every=5", "train.keep_states=3"), resume=True,
                         resume_with_changes=True)
    assert trainer.step == 2
    trainer.train()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_config_changes_ignore_bookkeeping_and_fill_missing_keys_with_defaults():
    cfg = load_config(CONFIGS / "vae_tiny.yaml")
    saved = json.loads(json.dumps(to_dict(cfg)))  # as a state's config.json holds it
    saved["train"].update(output_dir="elsewhere", sample_every=7, save_every=9)
    del saved["train"]["timestep_shift"]  # a state written before the key existed: its default then
    assert config_changes(saved, cfg) == []
    saved["model"]["vae"]["ch"] = 64
    saved["data"]["resolution"] = 64
    assert config_changes(saved, cfg) == [f"model.vae.ch: 64 in the state, {cfg.model.vae.ch} now",
                                          f"data.resolution: 64 in the state, {cfg.data.resolution} now"]


def test_resume_refuses_a_state_past_the_steps_or_of_another_trainer(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    with pytest.raises(RunFolderError, match="is at step 2, past train.steps=1"):
        VAETrainer(config(out, "train.steps=1"), resume=True, resume_with_changes=True)
    folder = RunFolder(out, "ldm", "model.safetensors")
    with pytest.raises(RunFolderError, match="is a training state of the vae trainer, not of ldm"):
        folder.check_resume(find_latest_state(out), config(out), allow_changes=True)


def test_a_state_missing_a_part_is_named(tmp_path):
    state = save_training_state(tmp_path, 5, {"unet": {}}, {"optimizer": {}}, {}, "{}")
    with pytest.raises(CheckpointError, match=r"state-00000005 lacks text_encoder.safetensors: it is damaged"):
        load_training_state(state, LDMTrainer.STATE_PARTS, LDMTrainer.STATE_OBJECTS)
    save_training_state(tmp_path, 6, {"unet": {}, "text_encoder": {}}, {"optimizer": {}}, {}, "{}")
    with pytest.raises(CheckpointError, match=r"state-00000006 lacks the trainer entries scheduler, ema"):
        load_training_state(tmp_path / "state-00000006", LDMTrainer.STATE_PARTS, LDMTrainer.STATE_OBJECTS)


def test_overrides_may_follow_resume_on_the_command_line(finished, tmp_path, capsys):
    from ldm.cli import train_vae

    out = copy_of(finished, tmp_path)
    argv = [str(CONFIGS / "vae_tiny.yaml"), *QUICK, f"train.output_dir={out}"]
    assert train_vae.main([*argv, "--resume-with-changes", "train.steps=3"]) == 0  # KEY=VALUE after the flag
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert "train.steps: 2 in the state, 3 now" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# One run per folder: the lock
# ---------------------------------------------------------------------------------------------

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom ldm.train.folder import FolderLock\n"
        "FolderLock(Path(sys.argv[1])).acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")


def test_a_second_run_on_a_folder_stops_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=rf"{tmp_path} is in use by another run \(process {proc.pid} on "):
            VAETrainer(config(tmp_path))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / ".lock").is_file()  # left behind by the killed process
    notes = []
    folder = RunFolder(tmp_path, "vae", "vae.safetensors", log=notes.append)
    folder.open(resume=False, overwrite=False)
    assert any(f"was left by process {proc.pid} on" in n and "no longer running (a stale lock)" in n for n in notes)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    folder.release()
    assert not (tmp_path / ".lock").exists()


def test_leftovers_of_an_interrupted_save_are_removed_when_a_run_takes_the_folder(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / ".state-00000003.tmp-4242").mkdir()
    (out / ".state-00000003.tmp-4242" / "vae.safetensors").write_bytes(b"half")
    (out / ".vae.safetensors.tmp-4242").write_bytes(b"half")
    (out / ".latest.tmp-77").write_text("state-00000003")
    (out / ".state-00000001.old-4242").mkdir()
    (out / "notes.tmp-1").write_text("the user's: not hidden, not ours")
    notes = []
    RunFolder(out, "vae", "vae.safetensors", log=notes.append).open(resume=True, overwrite=False)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]
    assert (out / "notes.tmp-1").is_file()
    assert "removed 4 leftovers of an interrupted save" in notes[0]


# ---------------------------------------------------------------------------------------------
# Stage 1 writes where train.vae_checkpoint says
# ---------------------------------------------------------------------------------------------


def test_a_mistyped_vae_checkpoint_trains_nothing_and_overwrites_nothing(finished, tmp_path):
    vae_dir = copy_of(finished, tmp_path)
    before = snapshot(vae_dir)
    vae_cfg = tmp_path / "vae.yaml"
    vae_cfg.write_text(f"base: {CONFIGS / 'vae_tiny.yaml'}\ntrain:\n  output_dir: {vae_dir}\n")
    cfg = load_config(SD_TINY, [f"train.vae_config={vae_cfg}", f"train.output_dir={tmp_path}/ldm",
                                f"train.vae_checkpoint={tmp_path}/rn/vae.safetensors"])
    with pytest.raises(ValueError, match=rf"did you mean train.vae_checkpoint={vae_dir}/vae.safetensors\? That file "
                                         "exists"):
        train_stages(cfg, log=lambda line: None)
    assert snapshot(vae_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "vae.yaml"]


def test_resume_with_a_missing_vae_and_no_stage_1_state_is_refused(tmp_path):
    vae_cfg = tmp_path / "vae.yaml"
    vae_cfg.write_text(f"base: {CONFIGS / 'vae_tiny.yaml'}\ntrain:\n  output_dir: {tmp_path}/vae\n")
    cfg = load_config(SD_TINY, [f"train.vae_config={vae_cfg}", f"train.output_dir={tmp_path}/ldm",
                                f"train.vae_checkpoint={tmp_path}/vae/vae.safetensors"])
    with pytest.raises(ValueError, match=r"--resume: nothing to continue: the VAE file .* does not exist and stage 1 "
                                         r"has no training state"):
        train_stages(cfg, resume=True, log=lambda line: None)
    same = load_config(SD_TINY, [f"train.vae_config={vae_cfg}", f"train.output_dir={tmp_path}/vae",
                                 f"train.vae_checkpoint={tmp_path}/vae/vae.safetensors"])
    with pytest.raises(ValueError, match="stage 1 and stage 2 would both write to"):
        train_stages(same, log=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.yaml"]


# ---------------------------------------------------------------------------------------------
# Disks that cannot take the run
# ---------------------------------------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_too_little_free_space_stops_before_the_first_step(tmp_path, monkeypatch):
    trainer = VAETrainer(config(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskError, match=r"not enough free disk space for this run \(3 training states of .* with "
                                        r"train.keep_states=2, and the export\) in .*: it needs about [\d.]+ \w+, "
                                        r"1000 B are free"):
        trainer.train()
    assert trainer.step == 0 and not list(tmp_path.glob("state-*"))


def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_state(tmp_path, monkeypatch):
    trainer = VAETrainer(config(tmp_path, "train.steps=3"))
    real = save_training_state

    def save(output_dir, step, *args, **kw):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(output_dir, step, *args, **kw)

    monkeypatch.setattr("ldm.train.loop.save_training_state", save)
    with pytest.raises(DiskError, match=r"cannot write the training state of step 2 to .*: the disk is full "
                                        r".*state-00000001 is intact; free space .* --resume"):
        trainer.train()
    assert find_latest_state(tmp_path).name == "state-00000001"


def test_a_read_only_output_folder_is_refused_before_anything_runs(tmp_path, monkeypatch):
    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(FolderLock, "_open_locked", read_only)
    with pytest.raises(DiskError, match=r"cannot write the run's lock file to .*: the file system is read-only"):
        VAETrainer(config(tmp_path / "ro"))


def test_save_every_zero_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.save_every must be >= 1 \(got 0\).*set it to train.steps"):
        config("x", "train.save_every=0")
    with pytest.raises(ConfigError, match=r"train.sample_every must be >= 0"):
        config("x", "train.sample_every=-1")
