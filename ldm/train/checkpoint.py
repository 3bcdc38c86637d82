"""Training state on disk: written atomically, found again after any interruption.

A state is a directory `state-<step>` holding the trained weights and their EMA (safetensors),
the optimizer and LR-schedule states (`trainer.pt`, loadable with `weights_only=True`), the
resolved config and `meta.json` (step, data position). It is written under a temporary name
and renamed only when complete, then the `latest` pointer is replaced atomically. A process
killed at any moment therefore leaves either the previous state or the new one, never a
half-written state that `latest` points to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir, write_text_atomic
from ..errors import CheckpointError

STATE_PREFIX = "state-"
LATEST = "latest"
META = "meta.json"


def save_training_state(
    output_dir: str | Path,
    step: int,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    trainer: Mapping[str, Any],
    meta: Mapping[str, Any],
    config_json: str,
    keep: int = 2,
) -> Path:
    """Write state `step` atomically and point `latest` at it; keep the newest `keep` states.

    weights: name -> state dict (saved as `<name>.safetensors`); trainer: optimizer/scheduler
    states and other plain objects (saved with torch.save); meta: JSON-able (step, data position).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = f"{STATE_PREFIX}{step:08d}"
    final = output_dir / name
    # an existing state of the same step (e.g. on interrupt right after a periodic save) is replaced
    with atomic_dir(final) as tmp:
        for part, state in weights.items():
            file = tmp / f"{part}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(file))
        torch.save(dict(trainer), tmp / "trainer.pt")
        (tmp / "config.json").write_text(config_json)
        (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2))
    write_text_atomic(output_dir / LATEST, name + "\n")
    for stale in list_states(output_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_states(output_dir: str | Path) -> list[Path]:
    """Complete states (renamed into place, with meta.json), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    states = [p for p in output_dir.glob(f"{STATE_PREFIX}*") if p.is_dir() and (p / META).is_file()]
    return sorted(states, key=lambda p: p.name)


def find_latest_state(output_dir: str | Path) -> Path | None:
    """The state `latest` points to, or the newest complete one if the pointer is missing or stale."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    if pointer.is_file():
        target = output_dir / pointer.read_text().strip()
        if (target / META).is_file():
            return target
    states = list_states(output_dir)
    return states[-1] if states else None


def read_state_json(path: str | Path, name: str) -> Any:
    """The JSON file `name` of a state directory (meta.json, config.json), or None when it is
    missing or not readable JSON."""
    try:
        return json.loads((Path(path) / name).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def load_training_state(
    path: str | Path, parts: Sequence[str] = (), objects: Sequence[str] = ()
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(weights by name, trainer objects, meta) of a state directory; `parts` are the weight files
    and `objects` the trainer entries it must hold (an error names what is missing)."""
    path = Path(path)
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is not a complete training state (no {META}); pick another or start afresh")
    missing = [f"{part}.safetensors" for part in parts if not (path / f"{part}.safetensors").is_file()]
    if not (path / "trainer.pt").is_file():
        missing.append("trainer.pt")
    if missing:
        raise CheckpointError(f"training state {path} lacks {', '.join(missing)}: it is damaged or of another "
                              "trainer; move it away to resume from an older state, or start a new run")
    try:
        weights = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        meta = json.loads((path / META).read_text())
    except Exception as e:  # any unreadable piece means the state cannot be resumed exactly
        raise CheckpointError(f"training state {path} cannot be read ({e}); move it away to resume from an older "
                              "one") from None
    absent = [name for name in objects if not isinstance(trainer, dict) or name not in trainer]
    if absent or not isinstance(meta, dict) or "step" not in meta:
        what = f"the trainer entries {', '.join(absent)}" if absent else f"a step in {META}"
        raise CheckpointError(f"training state {path} lacks {what}: it is damaged or of another trainer; move it "
                              "away to resume from an older state, or start a new run")
    return weights, trainer, meta
