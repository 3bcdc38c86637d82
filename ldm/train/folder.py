"""A training run's output folder: one run owns it at a time, and nothing in it is ever lost.

The contract every trainer keeps (docs/training.md, "Output folders and resuming"):
- a run holds the lock `<output_dir>/.lock` (a kernel lock, so it ends with the process; the file
  names the holder's PID, host and start) while it runs: a second run on the folder stops at once,
  naming the first; a lock file left by a process that died is named and taken over;
- leftovers of interrupted writes (`.state-*.tmp-PID`, `.model.safetensors.tmp-PID`, ...) are
  removed when a run takes the folder;
- a new run in a folder that holds another run (training states, an export) refuses to start,
  saying how to resume it, unless `overwrite`, which moves the old folder aside to
  `<output_dir>.old-<time>` (nothing is deleted);
- `resume` never starts from step 0: a folder without a complete state is an error, and a state
  whose config differs from the current one in anything that changes the result (model, data,
  seed, steps, optimizer, ...) is refused with the differences listed, unless `resume_with_changes`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..atomic import disk_error, remove_leftovers
from ..config import Config, to_dict
from .checkpoint import LATEST, META, STATE_PREFIX, find_latest_state, read_state_json

LOCK = ".lock"
# What a finished or interrupted run leaves in its folder besides its states and its export (and
# logs/ and samples/, which a new run adds to without harm).
RUN_FILES = (LATEST, "metrics.json")
# Config keys that may differ on resume because they do not change the trained weights: where
# files go, how often to log, sample and save, what the sample grids show, speed switches, and
# the settings of the held-out evaluation and of the exported file's sampling defaults.
RESULT_NEUTRAL = (
    "train.output_dir", "train.log_every", "train.log_with", "train.sample_every", "train.save_every",
    "train.keep_states", "train.sample_prompts", "train.sample_steps", "train.sample_cfg", "train.max_bad_steps",
    "train.compile", "train.channels_last", "train.vae_config", "data.heldout_size", "sample.",
)


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (in use, holding another run, nothing to resume)."""


def _lock_fd(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on the open file `fd`; False when another process holds it.
    POSIX record locks are per process and released by the kernel when the process ends."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):  # held by another process
            return False
        raise
    return True


def _read_holder(fd: int) -> dict:
    """Who the lock file `fd` says holds it ({} when it is empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError, RecursionError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))


def describe_holder(holder: dict) -> str:
    if not holder:
        return "a process that has not written its name yet"
    text = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    if holder.get("command"):
        text += f": {holder['command']}"
    return text


class FolderLock:
    """An exclusive lock on a folder through `<folder>/.lock`, which names its holder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> str | None:
        """Take the lock, or raise RunFolderError naming the live process that holds it. Returns a
        note when the lock file was left by a process that is gone (naming it), else None."""
        if self.fd is not None:
            return None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:300]}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._open_locked()
            try:
                previous = _read_holder(fd)
                _write_holder(fd, me)
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            raise disk_error(e, "the run's lock file", self.folder) from None
        self.fd = fd
        if previous and (previous.get("pid"), previous.get("host")) != (me["pid"], me["host"]):
            return (f"{self.path} was left by {describe_holder(previous)}, which is no longer running "
                    "(a stale lock); this run takes the folder over")
        return None

    def _open_locked(self) -> int:
        """The lock file, open and locked by this process."""
        for _ in range(10):  # the holder may remove the file between our open and our lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _lock_fd(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderError(
                    f"{self.folder} is in use by another run ({describe_holder(holder)}); wait for it to "
                    "finish or stop it, or give this run another train.output_dir")
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise RunFolderError(f"could not take the lock {self.path}: other processes keep replacing it")

    def release(self) -> None:
        """Give the folder up (the lock file goes with it)."""
        if self.fd is None:
            return
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass  # a read-only folder keeps its lock file; the next run finds it stale and says so
        os.close(self.fd)
        self.fd = None


def incomplete_states(folder: Path) -> list[Path]:
    """State folders without their meta.json (copied in part, or damaged by hand)."""
    return sorted(p for p in folder.glob(f"{STATE_PREFIX}*") if p.is_dir() and not (p / META).is_file())


def run_contents(folder: Path, export: str) -> list[str]:
    """What of a run (states, the export file `export`, metrics, `latest`) the folder holds, by name."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(STATE_PREFIX) or p.name in RUN_FILES or p.name == export)


def aside_name(folder: Path) -> Path:
    """A free name beside `folder` for its old content: `<folder>.old-<time>` (with -2, -3, ... if taken)."""
    base = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 0}} -> {"train.seed": 0} (lists and scalars are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def config_changes(saved: dict, current: Config) -> list[str]:
    """The result-changing differences between a state's saved config and `current`, one line each
    (`train.seed: 0 in the state, 1 now`). Keys the saved config lacks (it predates them) count as
    their defaults; keys it has that no longer exist are ignored."""
    now = flatten(to_dict(current))
    then = {**flatten(to_dict(Config())), **flatten(saved)}
    lines = []
    for key, value in now.items():
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESULT_NEUTRAL):
            continue
        if then.get(key) != value:
            lines.append(f"{key}: {then.get(key)!r} in the state, {value!r} now")
    return lines


class RunFolder:
    """The output folder of one trainer's run: take it (`open`), pick the state to resume, give it up."""

    def __init__(self, folder: str | Path, trainer: str, export: str, *, main: bool = True,
                 log: Callable[[str], None] = print):
        """`trainer`: the trainer's name (its states say it); `export`: the name of its export file
        (an input file of the same name in the folder, such as stage 2's VAE, is not a run's);
        `main`: this process writes (rank 0)."""
        self.path = Path(folder)
        self.trainer = trainer
        self.export = export
        self.main = main
        self.log = log
        self.lock = FolderLock(self.path)

    def open(self, *, resume: bool, overwrite: bool) -> None:
        """Take the folder for a new run, or for resuming the run in it (rank 0; other ranks only
        read). Raises RunFolderError, before anything in the folder changes, when it cannot."""
        if resume and overwrite:
            raise RunFolderError("--resume continues the run in train.output_dir and --overwrite moves it aside; "
                                 "pass one of them")
        if not self.main:
            return
        note = self.lock.acquire()
        if note:
            self.log(f"note: {note}")
        try:
            removed = remove_leftovers(self.path)
            if removed:
                self.log(f"removed {len(removed)} leftovers of an interrupted save in {self.path}: "
                         f"{', '.join(p.name for p in removed[:5])}{' ...' if len(removed) > 5 else ''}")
            if resume:
                self._resumable()
                return
            contents = run_contents(self.path, self.export)
            if contents and not overwrite:
                raise RunFolderError(
                    f"{self.path} holds another run ({self._describe(contents)}). Continue it with --resume; "
                    f"or start a new run here with --overwrite, which moves the old one to "
                    f"{aside_name(self.path)} (nothing is deleted); or choose another train.output_dir")
            if contents:
                self._move_aside()
        except BaseException:
            self.lock.release()
            raise

    def _describe(self, contents: list[str]) -> str:
        states = [n for n in contents if n.startswith(STATE_PREFIX)]
        parts = []
        if states:
            newest = find_latest_state(self.path)
            where = ""
            if newest is not None:
                meta = read_state_json(newest, META) or {}
                config = read_state_json(newest, "config.json") or {}
                train = config.get("train", {}) if isinstance(config, dict) else {}
                where = (f", newest {newest.name}: step {meta.get('step', '?')} of {train.get('steps', '?')}, "
                         f"seed {train.get('seed', '?')}")
            parts.append(f"{len(states)} training state{'s' * (len(states) > 1)}{where}")
        parts += [n for n in contents if not n.startswith(STATE_PREFIX) and n != LATEST]
        return "; ".join(parts) or ", ".join(contents)

    def _move_aside(self) -> None:
        """Rename the folder to `<folder>.old-<time>` and take a fresh one under the old name."""
        aside = aside_name(self.path)
        try:
            os.rename(self.path, aside)  # the held lock moves with it, so no one slips in meanwhile
        except OSError as e:
            raise RunFolderError(f"--overwrite could not move {self.path} aside to {aside} ({e}); move it "
                                 "yourself, or choose another train.output_dir") from None
        old = self.lock
        self.lock = FolderLock(self.path)
        try:
            self.lock.acquire()
        finally:
            old.folder, old.path = aside, aside / LOCK
            old.release()
        self.log(f"--overwrite: moved the previous run in {self.path} to {aside}")

    def _resumable(self) -> None:
        """Set incomplete states newer than the one resumed aside; raise when none is complete."""
        state = find_latest_state(self.path)
        broken = incomplete_states(self.path)
        if state is None:
            found = f" ({', '.join(p.name for p in broken)}: incomplete, no {META})" if broken else ""
            raise RunFolderError(
                f"--resume: no training state to continue in {self.path}{found}; check train.output_dir, or drop "
                "--resume to start a new run from step 0")
        for path in broken:
            if path.name > state.name:
                target = path.with_name(f"{path.name}.incomplete")
                os.rename(path, target)
                self.log(f"note: {path.name} is incomplete (no {META}); kept as {target.name}, resuming from "
                         f"{state.name}")

    def hold(self) -> None:
        """Hold the lock again after `release` (another run of the same trainer object; rank 0)."""
        if self.main:
            self.lock.acquire()

    def state(self) -> Path | None:
        """The state to resume from (any rank, after `open`)."""
        return find_latest_state(self.path)

    def check_resume(self, state: Path, cfg: Config, *, allow_changes: bool) -> None:
        """Refuse to resume `state` into a run configured as `cfg` when that changes the result
        (unless `allow_changes`, when the differences are only reported), or when the state belongs
        to another trainer or lies past train.steps."""
        meta = read_state_json(state, META) or {}
        saved = read_state_json(state, "config.json")
        kind = meta.get("trainer")
        if kind is not None and kind != self.trainer:
            raise RunFolderError(f"{state} is a training state of the {kind} trainer, not of {self.trainer}; "
                                 "check train.output_dir")
        step = meta.get("step", 0)
        if step > cfg.train.steps:
            raise RunFolderError(f"{state} is at step {step}, past train.steps={cfg.train.steps}: raise train.steps "
                                 "(with --resume-with-changes) to train on, or use the run's export")
        if isinstance(saved, dict):
            changes = config_changes(saved, cfg)
        else:
            changes = ["config.json: missing or unreadable in the state, so the settings cannot be compared"]
        if not changes:
            return
        listing = "\n  ".join(changes)
        if not allow_changes:
            raise RunFolderError(
                f"--resume: the config differs from the one {state} was trained with, in settings that change "
                f"the result:\n  {listing}\nresume with the same settings, pass --resume-with-changes to "
                "continue with these on purpose, or start a new run (another train.output_dir, or --overwrite)")
        self.log(f"--resume-with-changes: continuing {state} with\n  {listing}")

    def release(self) -> None:
        self.lock.release()
