"""Exponential moving average of a model's weights, kept beside the trained weights."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of every floating-point parameter and buffer of `model`, in float32.

    The decay warms up as min(decay, (1 + n) / (10 + n)) with n updates, so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1) (got {decay})")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)  # shadow = d * shadow + (1 - d) * v
        self.num_updates += 1

    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s state dict with the averaged values, in the model's dtypes."""
        state = model.state_dict()
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v).detach().clone() for k, v in state.items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("EMA state does not match the model: different parameter names")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        # each average stays on the device of the weights it follows (a state is read onto the CPU)
        self.shadow = {k: v.to(self.shadow[k].device, torch.float32, copy=True) for k, v in state["shadow"].items()}
