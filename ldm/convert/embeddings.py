"""Textual-inversion files in: AUTOMATIC1111's and diffusers' layouts -> (name, vectors).

- A1111 `.pt`: `{"string_to_param": {"*": (n, D)}, "name": ..., "step": ...}`, read with
  `weights_only=True`.
- A1111 `.safetensors`: `{"emb_params": (n, D)}`.
- diffusers `learned_embeds.bin` / `.safetensors`: `{token: (D,) or (n, D)}`.
- a bare tensor saved with `torch.save`.

The name a prompt uses is the `token` asked for; otherwise the token a diffusers file stores, and
for A1111's layouts the file's name without its extension (as A1111 names embeddings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..checkpoint import atomic_save_safetensors
from ..errors import CheckpointError
from .single_file import read_weights_file

A1111_SAFETENSORS_KEY = "emb_params"
SDXL_KEYS = frozenset({"clip_l", "clip_g"})


def read_embedding(path: str | Path, token: str | None = None, *, trust_pickle: bool = False) -> tuple[str, torch.Tensor]:
    """(name, float32 (n, D) vectors) of a textual-inversion file; errors name the file and the fix."""
    path = Path(path)
    fix = ("load it with trust_pickle=True (pipe.load_textual_inversion(path, trust_pickle=True)); "
           "ldm.convert.embeddings.save_embedding then writes a safe .safetensors copy.")
    data, _ = read_weights_file(path, what="embedding", trust_pickle=trust_pickle, fix=fix)
    name, vectors = _find_vectors(data, path)
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise CheckpointError(f"{path}: the embedding's vectors are not a floating-point tensor")
    vectors = vectors.detach().to("cpu", torch.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise CheckpointError(
            f"{path}: expected embedding vectors of shape (n, width), got {tuple(vectors.shape)}"
        )
    return token or name, vectors


def _find_vectors(data: object, path: Path) -> tuple[str, object]:
    if isinstance(data, torch.Tensor):
        return path.stem, data
    if not isinstance(data, Mapping) or not data:
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a textual-inversion embedding")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            n = len(params) if isinstance(params, Mapping) else "no"
            raise CheckpointError(
                f"{path}: string_to_param holds {n} entries; an A1111 embedding file holds exactly one"
            )
        return path.stem, next(iter(params.values()))
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if SDXL_KEYS <= tensors.keys():
        raise CheckpointError(
            f"{path} is an SDXL embedding (vectors for two text encoders, clip_l and clip_g); this model "
            "has one text encoder: use an embedding trained for it"
        )
    if A1111_SAFETENSORS_KEY in tensors:
        return path.stem, tensors[A1111_SAFETENSORS_KEY]
    if len(tensors) == 1 and len(data) == 1:  # diffusers: {token: vectors}
        return next(iter(tensors.items()))
    keys = ", ".join(map(str, list(data)[:6]))
    raise CheckpointError(
        f"{path} is not a textual-inversion embedding in a known layout (keys: {keys}); expected "
        "A1111's string_to_param or emb_params, or diffusers' single {token: vectors} entry"
    )


def save_embedding(path: str | Path, name: str, vectors: torch.Tensor) -> Path:
    """Write (n, D) vectors as an A1111 `.safetensors` embedding (`emb_params`), which A1111,
    ComfyUI and diffusers read. A1111 names it after the file, so name the file after the token."""
    return atomic_save_safetensors({A1111_SAFETENSORS_KEY: vectors.detach().to("cpu").contiguous()}, path,
                                   {"name": name})
