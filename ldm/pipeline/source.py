"""Where a pipeline's weights came from: the model file or folder (or the config of random weights),
the hints it was loaded with, a swapped-in VAE, and the files' SHA-256.

`LDMPipeline.load` and `from_config` set `pipe.source`; `record()` is what a generated PNG keeps
about the model (so that the image can be made again, see `ldm.png_settings`), with the hashes
AUTOMATIC1111 writes as `Model hash` and `VAE hash` (the first 10 hex digits of the file's SHA-256).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

HASH_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str | None:
    """The SHA-256 of a file, in hex; None for a folder (a diffusers model has no one file to hash)."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ModelSource:
    """What a pipeline was loaded from. `path` is None for random weights built from `config`."""

    path: str | None = None
    format: str | None = None  # "ours", "single", "diffusers", or "config" (random weights)
    config: str | None = None  # the config of random weights, or the architecture hint given with a file
    overrides: tuple[str, ...] = ()  # --set overrides of a config
    prediction_type: str | None = None  # the hint given with a file, if any
    vae: str | None = None  # a standalone VAE loaded in place of the model's
    seed: int | None = None  # the seed of random weights

    @property
    def name(self) -> str:
        """The model's name as AUTOMATIC1111 writes it: the file name without its extension."""
        where = self.path or self.config or "model"
        return Path(where.rstrip("/\\")).stem or str(where)

    @cached_property
    def sha256(self) -> str | None:
        return file_sha256(self.path) if self.path else None

    @cached_property
    def vae_sha256(self) -> str | None:
        return file_sha256(self.vae) if self.vae else None

    def record(self) -> dict[str, Any]:
        """This source as plain JSON data: what a PNG stores about the model it was made with."""
        out: dict[str, Any] = {"name": self.name, "format": self.format}
        if self.path:
            out.update(path=self.path, sha256=self.sha256)
        if self.config:
            out["config"] = self.config
        if self.overrides:
            out["overrides"] = list(self.overrides)
        if self.seed is not None:
            out["seed"] = self.seed
        if self.prediction_type:
            out["prediction_type"] = self.prediction_type
        if self.vae:
            out.update(vae=self.vae, vae_sha256=self.vae_sha256)
        return out
