"""The models a server offers: listed by title, loaded one at a time, switched on request.

Clients name a model the way A1111 lists it (`GET /sdapi/v1/sd-models`): by title (the file
name), by title with its short hash (`model.safetensors [0123456789]`), by model name (the file
name without extension) or by path. Only the worker thread loads; the HTTP side only looks up.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Config
from ..convert.formats import model_config
from ..errors import CheckpointError
from ..pipeline import LDMPipeline
from ..pipeline.source import file_sha256

MODEL_SUFFIXES = (".safetensors", ".ckpt")
log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """One model the server can load."""

    title: str  # how clients name it: the file name (A1111's title, less the hash)
    filename: str  # the model file, or the config of a random-weight model
    load: Callable[[], LDMPipeline]
    cfg: Config  # architecture and sampling defaults, known without loading the weights
    config: str | None = None  # the config file a random-weight model is built from
    sha256: str | None = None  # of the file, known once it has been loaded

    @property
    def model_name(self) -> str:
        return Path(self.title).stem

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    def record(self) -> dict:
        """What a PNG records about this model (as `ldm.pipeline.source.ModelSource.record` does)."""
        if self.config is not None:
            return {"name": self.model_name, "format": "config", "config": self.config}
        return {"name": self.model_name, "path": self.filename, "sha256": self.sha256}

    def item(self) -> dict:
        """The entry as A1111's `/sdapi/v1/sd-models` lists it."""
        title = f"{self.title} [{self.shorthash}]" if self.shorthash else self.title
        return {"title": title, "model_name": self.model_name, "hash": self.shorthash, "sha256": self.sha256,
                "filename": self.filename, "config": self.config}


def file_entry(path: str | Path, load: Callable[[Path], LDMPipeline], root: Path | None = None, *,
               config: str | Path | Config | None = None, prediction_type: str | None = None) -> ModelEntry:
    """An entry for a model in any format `LDMPipeline.load` reads (an ldm file, an original single
    file, a diffusers folder); titled by its path under `root` (or its name). Its config is read
    without its weights (`ldm.convert.formats.model_config`, with the same hints as the load)."""
    path = Path(path)
    cfg = model_config(path, config=config, prediction_type=prediction_type)
    title = str(path.relative_to(root)) if root is not None else path.name
    return ModelEntry(title=title, filename=str(path), load=lambda: load(path), cfg=cfg)


def folder_entries(folder: str | Path, load: Callable[[Path], LDMPipeline]) -> list[ModelEntry]:
    """Entries for every model under `folder` (recursively: `.safetensors` and `.ckpt` files, and
    diffusers folders), sorted by title. Files that are not whole models (a VAE, a LoRA) are skipped
    with a warning that names them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--models-dir {folder} is not a folder")
    diffusers = sorted(p.parent for p in folder.rglob("model_index.json"))
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_SUFFIXES
             and not any(p.is_relative_to(d) for d in diffusers)]
    entries = []
    for path in sorted([*found, *diffusers]):
        try:
            entries.append(file_entry(path, load, root=folder))
        except CheckpointError as e:
            log.warning("--models-dir: skipping %s, which is not a model this server loads: %s", path, e)
    return entries


class ModelCatalog:
    """Titles -> entries; one pipeline loaded at a time; `current` serves requests that name none.

    `prepare(pipe)` runs on every freshly loaded pipeline (the server fixes its U-Net batch shape).
    """

    def __init__(self, entries: list[ModelEntry], prepare: Callable[[LDMPipeline], LDMPipeline] | None = None):
        if not entries:
            raise ValueError("no models to serve; pass --ckpt MODEL.safetensors, --models-dir DIR or --config")
        titles = [e.title for e in entries]
        dupes = sorted({t for t in titles if titles.count(t) > 1})
        if dupes:
            raise ValueError(f"two models share the title {dupes[0]!r}; serve files with different names")
        self.entries = {e.title: e for e in entries}
        self.current = entries[0].title
        self.prepare = prepare or (lambda pipe: pipe)
        self._loaded: tuple[str, LDMPipeline] | None = None
        self._lock = threading.Lock()

    @classmethod
    def of_pipeline(cls, pipe: LDMPipeline, title: str = "model") -> ModelCatalog:
        """A catalog of one already built pipeline (tests, embedding the server in a program)."""
        cfg = Config(model=pipe.model_config, sample=pipe.defaults)
        return cls([ModelEntry(title=title, filename=title, load=lambda: pipe, cfg=cfg)])

    def find(self, name: str) -> ModelEntry:
        """The entry a client's name refers to; ValueError listing the titles when none does."""
        bare = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", name.strip())
        for entry in self.entries.values():
            if bare in (entry.title, entry.model_name, entry.filename) or Path(bare).name == entry.title:
                return entry
        raise ValueError(f"unknown model {name!r}; this server has: {', '.join(self.entries)}")

    @property
    def loaded(self) -> str | None:
        """Title of the model in memory, if any."""
        return self._loaded[0] if self._loaded else None

    def pipeline(self, title: str) -> LDMPipeline:
        """The pipeline of `title`, loading it (and freeing the one loaded before) if needed."""
        with self._lock:
            if self._loaded and self._loaded[0] == title:
                return self._loaded[1]
            entry = self.entries[title]
            self._loaded = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            pipe = self.prepare(entry.load())
            if entry.sha256 is None and entry.config is None and Path(entry.filename).is_file():
                entry.sha256 = file_sha256(entry.filename)
            self._loaded = (title, pipe)
            return pipe
