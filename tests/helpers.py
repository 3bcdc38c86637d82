"""Shared by the pipeline tests (importable because pytest puts tests/ on sys.path)."""

import torch

from ldm import LDMPipeline


def randomize(p: LDMPipeline, seed: int = 1) -> LDMPipeline:
    """Give zero-initialised layers random values so outputs depend on every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in p.modules.values():
            for param in m.parameters():
                if param.abs().max() == 0:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.02)
    return p
