"""LoRA: low-rank updates W + multiplier * (alpha / rank) * up @ down to weights of our networks.

(Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3; `alpha / rank` is
the scaling of kohya's and peft's implementations, which the LoRA files in circulation assume.)

A `Target` names the weight an adapter changes by its state-dict key in its network ("unet" or
"text_encoder"), plus a block of rows where one tensor holds several projections (OpenCLIP's
fused `in_proj_weight`: q, k and v). A `LoRANetwork` holds one LoRA's adapters, trainable
`down`/`up` parameters and an `alpha` each, and acts on live networks without changing any
state-dict key:

- attached, forward hooks add `multiplier * (alpha / rank) * up(down(x))` to the output of the layer
  that uses the weight (to its rows' channels, for fused projections). The weights are untouched,
  so detaching is exact, and gradients reach only `down` and `up`: this is how a trainer uses it.
- `LoRAStack.fuse` merges the adapters into the weights instead (no cost per step); see there.

Targets keep their meaning when the U-Net's attention projections are fused for speed
(`ldm.speed`): `to_q.weight` then resolves to the first rows of `to_qkv.weight`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .attention import FUSED_NAMES, CrossAttention
from .text import CausalSelfAttention


@dataclass(frozen=True)
class Target:
    """A weight (or a block of its rows) of one of the pipeline's networks."""

    network: str  # "unet" or "text_encoder"
    key: str  # the weight's state-dict key in that network
    rows: tuple[int, int] | None = None  # [start, stop) of the weight's rows; None: all

    def __str__(self) -> str:
        rows = f"[{self.rows[0]}:{self.rows[1]}]" if self.rows else ""
        return f"{self.network}.{self.key}{rows}"


@dataclass
class LoRAWeights:
    """One adapter's tensors in the layout of its target: down (rank, in) and up (out, rank) for a
    Linear weight, (rank, in, kh, kw) and (out, rank, 1, 1) for a convolution's."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Site:
    """Where a target lives in the live networks: the module whose output receives the update and
    the parameter (and rows of it) that merging changes."""

    module: nn.Module
    param: nn.Parameter
    rows: tuple[int, int] | None

    @property
    def conv(self) -> nn.Conv2d | None:
        return self.module if isinstance(self.module, nn.Conv2d) else None

    def weight(self) -> torch.Tensor:
        """The target's part of the parameter, as a view (writes go to the parameter)."""
        if self.rows is None:
            return self.param
        return self.param.narrow(0, self.rows[0], self.rows[1] - self.rows[0])


def resolve(networks: Mapping[str, nn.Module], target: Target) -> Site:
    """The live site of `target`; a LookupError when the networks have no such weight."""
    if target.network not in networks:
        raise LookupError(f"no network {target.network!r} (have {', '.join(networks)})")
    root = networks[target.network]
    path, _, name = target.key.rpartition(".")
    owner = _submodule(root, path)
    if name == "weight" and isinstance(owner, (nn.Linear, nn.Conv2d)):
        return Site(owner, owner.weight, target.rows)
    if name == "in_proj_weight" and isinstance(owner, CausalSelfAttention):
        return Site(owner.in_proj, owner.in_proj_weight, target.rows)
    if name == "weight" and owner is None:
        # a projection of a fused attention layer (ldm.speed.fuse_qkv): rows of to_qkv / to_kv
        parent_path, _, proj = path.rpartition(".")
        parent = _submodule(root, parent_path)
        if isinstance(parent, CrossAttention) and parent.fused and proj in FUSED_NAMES[parent.fused]:
            fused = getattr(parent, "to_" + parent.fused)
            names = FUSED_NAMES[parent.fused]
            n = fused.out_features // len(names)
            start = names.index(proj) * n
            rows = (start, start + n) if target.rows is None else (start + target.rows[0], start + target.rows[1])
            return Site(fused, fused.weight, rows)
    raise LookupError(f"{target} is not a Linear or Conv2d weight of this model")


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class LoRAAdapter(nn.Module):
    """The low-rank update of one weight: `forward(x)` = (alpha / rank) * up(down(x))."""

    def __init__(self, weights: LoRAWeights):
        super().__init__()
        self.down = nn.Parameter(weights.down)
        self.up = nn.Parameter(weights.up)
        self.alpha = float(weights.alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor, conv: nn.Conv2d | None = None) -> torch.Tensor:
        if conv is None:
            return F.linear(F.linear(x, self.down), self.up) * self.scale
        # the down projection convolves like the layer it adapts; up mixes channels (1x1)
        h = F.conv2d(x, self.down, None, conv.stride, conv.padding, conv.dilation)
        return F.conv2d(h, self.up) * self.scale

    def delta_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """The update of the weight, float32, in its layout: (out, in) or (out, in, kh, kw)."""
        up, down = self.up.detach().float(), self.down.detach().float()
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scale

    def weights(self) -> LoRAWeights:
        return LoRAWeights(self.down.detach(), self.up.detach(), self.alpha)


class LoRANetwork(nn.Module):
    """The adapters of one LoRA, one per target, and the multiplier it is applied with."""

    def __init__(self, weights: Mapping[Target, LoRAWeights], multiplier: float = 1.0, source: str | None = None):
        super().__init__()
        self.targets = list(weights)
        self.adapters = nn.ModuleList(LoRAAdapter(w) for w in weights.values())
        self.multiplier = float(multiplier)
        self.source = source  # the file it was read from, if any
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def create(
        cls, networks: Mapping[str, nn.Module], targets: list[Target], rank: int, alpha: float | None = None,
        *, generator: torch.Generator | None = None,
    ) -> LoRANetwork:
        """A new LoRA to train: `down` drawn as kohya and peft draw it (Kaiming-uniform with
        a = sqrt(5), nn.Linear's default) and `up` zero, so that it adds nothing at first."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1 (got {rank!r}); 4-128 is typical")
        weights = {}
        for target in targets:
            site = resolve(networks, target)
            w = site.weight()
            down = torch.empty(rank, *w.shape[1:], dtype=torch.float32)
            bound = 1 / math.sqrt(down[0].numel())  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            down.uniform_(-bound, bound, generator=generator)
            up = torch.zeros(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []))
            weights[target] = LoRAWeights(down.to(w.dtype), up.to(w.dtype), float(rank if alpha is None else alpha))
        return cls(weights)

    def weights(self) -> dict[Target, LoRAWeights]:
        """The current tensors by target (to save, e.g. with `ldm.convert.lora.save_lora`)."""
        return {t: a.weights() for t, a in zip(self.targets, self.adapters)}

    def sites(self, networks: Mapping[str, nn.Module]) -> list[Site]:
        """Every target's live site, checked against the adapter's shape before anything changes."""
        sites = []
        for target, adapter in zip(self.targets, self.adapters):
            site = resolve(networks, target)
            shape = tuple(site.weight().shape)
            if adapter.delta_shape() != shape:
                raise ValueError(f"the LoRA for {target} has shape {adapter.delta_shape()}, the weight {shape}")
            sites.append(site)
        return sites

    def attach(self, networks: Mapping[str, nn.Module]) -> None:
        """Apply through forward hooks (all sites are checked first)."""
        if self._hooks:
            return
        for site, adapter in zip(self.sites(networks), self.adapters):
            self._hooks.append(site.module.register_forward_hook(_Hook(self, adapter, site)))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @property
    def attached(self) -> bool:
        return bool(self._hooks)


class _Hook:
    """Adds one adapter's output, times its network's current multiplier, to a layer's output."""

    def __init__(self, network: LoRANetwork, adapter: LoRAAdapter, site: Site):
        self.network, self.adapter, self.site = network, adapter, site
        self.dim = 1 if site.conv is not None else -1  # the output's channel dim

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        delta = self.adapter(args[0], self.site.conv) * self.network.multiplier
        if self.site.rows is None:
            return out + delta
        start, stop = self.site.rows
        # in place is safe for autograd: Linear and Conv2d do not keep their output for backward
        out.narrow(self.dim, start, stop - start).add_(delta)
        return out


class LoRAStack:
    """The LoRAs applied to a pipeline's networks, by name, each with its multiplier.

    Unfused (as loaded), every LoRA acts through forward hooks. `fuse()` merges them all into the
    weights, W = W0 + sum_i multiplier_i * delta_i computed in float32, and removes the hooks: the
    sampling path is then the plain one. W0 is kept on the CPU, and `unfuse()` writes it back bit
    for bit. A change while fused (a LoRA added or removed, a new multiplier) unfuses, changes and
    fuses again, so the weights always hold W0 plus the current LoRAs.
    """

    def __init__(self, networks: Mapping[str, nn.Module]):
        self.networks = networks
        self.loras: dict[str, LoRANetwork] = {}
        self.fused = False
        self._originals: dict[Target, torch.Tensor] = {}  # W0 of each fused target, on the CPU

    def __len__(self) -> int:
        return len(self.loras)

    def add(self, name: str, lora: LoRANetwork) -> None:
        """Apply `lora` under `name`; every target is checked before anything changes."""
        if name in self.loras:
            raise ValueError(
                f"a LoRA named {name!r} is already loaded; change its scale with pipe.set_lora_scale({name!r}, s), "
                "unload it first, or load this one under another name="
            )
        lora.sites(self.networks)  # raises before any change
        with self._changing():
            self.loras[name] = lora

    def remove(self, name: str | None = None) -> None:
        """Remove one LoRA (or all, with None): the networks compute exactly what they did before it."""
        names = list(self.loras) if name is None else [self._known(name)]
        with self._changing():
            for n in names:
                self.loras.pop(n).detach()

    def get(self, name: str) -> LoRANetwork:
        return self.loras[self._known(name)]

    def set_multiplier(self, name: str, multiplier: float) -> None:
        lora = self.get(name)
        with self._changing():
            lora.multiplier = float(multiplier)

    @torch.no_grad()
    def fuse(self) -> None:
        """Merge every LoRA into the weights (W0 kept on the CPU) and remove the hooks."""
        if self.fused:
            return
        for lora in self.loras.values():
            lora.detach()
        deltas: dict[Target, list[tuple[LoRAAdapter, float]]] = {}
        for lora in self.loras.values():
            for target, adapter in zip(lora.targets, lora.adapters):
                deltas.setdefault(target, []).append((adapter, lora.multiplier))
        for target, parts in deltas.items():
            view = resolve(self.networks, target).weight()
            original = self._originals.setdefault(target, view.detach().to("cpu", copy=True))
            merged = original.to(view.device, torch.float32, copy=True)  # never the backup itself
            for adapter, multiplier in parts:
                merged += multiplier * adapter.delta().to(view.device)
            view.copy_(merged.to(view.dtype))
        self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        """Write W0 back into every fused weight (bit for bit) and attach the hooks again."""
        if not self.fused:
            return
        for target, original in self._originals.items():
            view = resolve(self.networks, target).weight()
            view.copy_(original)
        self._originals.clear()
        self.fused = False
        for lora in self.loras.values():
            lora.attach(self.networks)

    @contextmanager
    def detached(self) -> Iterator[None]:
        """Hooks off while the networks' modules are rebuilt (e.g. fused projections), then on
        again on the new modules. Fused weights need nothing: targets resolve anew."""
        attached = [lora for lora in self.loras.values() if lora.attached]
        for lora in attached:
            lora.detach()
        try:
            yield
        finally:
            for lora in attached:
                lora.attach(self.networks)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        for lora in self.loras.values():
            lora.to(device=device, dtype=dtype)

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Unfused (hooks) while the set of LoRAs changes, then as it was."""
        was_fused = self.fused
        self.unfuse()
        try:
            yield
        finally:
            for lora in self.loras.values():
                lora.attach(self.networks)
            if was_fused:
                self.fuse()

    def _known(self, name: str) -> str:
        if name not in self.loras:
            loaded = ", ".join(self.loras) or "none"
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return name
