"""LoRA and textual-inversion methods of `LDMPipeline`: load, scale, fuse, unload, export.

    name = pipe.load_lora("style.safetensors", scale=0.8)    # kohya/A1111 or diffusers/peft layout
    pipe.load_lora("detail.safetensors", 0.5)                 # several at once, each with its scale
    pipe.fuse_lora()                                          # merged into the weights: plain speed
    pipe.unload_lora()                                        # the original weights, bit for bit
    pipe.load_textual_inversion("EasyNegative.safetensors")   # then "EasyNegative" works in prompts

A loaded LoRA acts through hooks on the layers it changes (the weights are untouched); `fuse_lora`
merges every loaded LoRA into the weights instead, which costs nothing per step, and `unfuse_lora`
or `unload_lora` restores the original weights exactly. Saving a model (`pipe.save`) writes the
weights as they are: with fused LoRAs baked in, without unfused ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch

from ..convert.embeddings import read_embedding
from ..convert.lora import read_lora, save_lora
from ..devices import parse_dtype
from ..models.lora import LoRANetwork, LoRAStack
from ..models.textual_inversion import add_embedding, remove_embedding
from ..models.tokenizer import clean_text
from .source import file_sha256


class AdapterMethods:
    """Mixed into `LDMPipeline`, which provides `loras` (a `LoRAStack`), `text_encoder`,
    `model_config`, `device`, `dtype`, `speed` and `optimize`."""

    loras: LoRAStack
    embedding_files: dict[str, str]

    def load_lora(self, path: str | Path, scale: float = 1.0, *, name: str | None = None,
                  trust_pickle: bool = False) -> str:
        """Apply a LoRA file at `scale` (its multiplier; 1 = as trained) and return its name (the
        file's stem unless `name` is given). Repeatable. The whole file is checked against this
        model first: a file that does not fit raises and changes nothing."""
        scale = _check_scale(scale)
        path = Path(path)
        weights, _ = read_lora(path, self.model_config, trust_pickle=trust_pickle)
        network = LoRANetwork(weights, multiplier=scale, source=str(path))
        network.to(self.device, self.dtype)
        name = name or path.stem
        self.loras.add(name, network)
        self._adapters_changed()
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change the multiplier of a loaded LoRA (0 switches it off without unloading it)."""
        self.loras.set_multiplier(name, _check_scale(scale))
        self._adapters_changed()

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA by name, or all of them; the model then computes exactly what it did."""
        self.loras.remove(name)
        self._adapters_changed()

    def fuse_lora(self) -> None:
        """Merge the loaded LoRAs into the weights (no per-step cost; a copy of the original
        weights is kept on the CPU). Later changes re-merge; `unfuse_lora` undoes it exactly."""
        self.loras.fuse()
        self._adapters_changed()

    def unfuse_lora(self) -> None:
        """Restore the original weights bit for bit; the LoRAs stay loaded, acting through hooks."""
        self.loras.unfuse()
        self._adapters_changed()

    @property
    def lora_scales(self) -> dict[str, float]:
        """The loaded LoRAs' names and scales, in load order."""
        return {name: lora.multiplier for name, lora in self.loras.loras.items()}

    def save_lora(self, path: str | Path, name: str | None = None, *, metadata: Mapping[str, str] | None = None,
                  dtype: str | torch.dtype | None = None) -> Path:
        """Write a loaded LoRA in the kohya layout, which A1111, ComfyUI and diffusers read (in
        `dtype`, e.g. "fp16", or as loaded); `name` may be left out when one is loaded."""
        if name is None:
            if len(self.loras) != 1:
                raise ValueError(f"{len(self.loras)} LoRAs are loaded ({', '.join(self.loras.loras) or 'none'}); "
                                 "pass the name of the one to save")
            name = next(iter(self.loras.loras))
        return save_lora(path, self.loras.get(name).weights(), self.model_config, metadata=metadata,
                         dtype=parse_dtype(dtype) if dtype is not None else None)

    def load_textual_inversion(self, path: str | Path, token: str | None = None, *,
                               trust_pickle: bool = False) -> str:
        """Add a textual-inversion embedding (A1111 `.pt` / `.safetensors` or diffusers
        `learned_embeds`) and return the word prompts use for it: `token`, else the token a
        diffusers file stores, else the file's stem (as in A1111). Matched case-insensitively."""
        name, vectors = read_embedding(path, token, trust_pickle=trust_pickle)
        add_embedding(self.text_encoder, name, vectors, source=str(path))
        self.embedding_files[name] = str(path)
        return name

    def unload_textual_inversion(self, token: str | None = None) -> None:
        """Forget one embedding by its word, or all of them."""
        remove_embedding(self.text_encoder, token)
        self.embedding_files = {} if token is None else {
            name: path for name, path in self.embedding_files.items() if clean_text(name) != clean_text(token)}

    def adapters_record(self) -> dict[str, list[dict]]:
        """The loaded LoRAs (name, file, scale, SHA-256) and embeddings (word, file, SHA-256) as plain
        JSON data: what a generated PNG records beside its model (see `ldm.png_settings`)."""
        out: dict[str, list[dict]] = {}
        if self.loras.loras:
            out["loras"] = [{"name": name, "path": lora.source, "scale": lora.multiplier,
                             "sha256": file_sha256(lora.source) if lora.source else None}
                            for name, lora in self.loras.loras.items()]
        if self.embedding_files:
            out["embeddings"] = [{"token": token, "path": path, "sha256": file_sha256(path)}
                                 for token, path in self.embedding_files.items()]
        return out

    def _adapters_changed(self) -> None:
        # compiled forwards and captured CUDA graphs hold the hooks and scales they were made with
        if self.speed.compile or self.speed.cuda_graphs:
            self.optimize(self.speed)


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"a LoRA scale must be a finite number (got {scale!r}); 1 applies it as trained")
    return float(scale)
