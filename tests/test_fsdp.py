"""ldm.train.fsdp without a process group: what is sharded as a unit, and which launch settings
are refused. (The 2-process FSDP training run is in test_ldm_training.py.)"""

import pytest

from helpers import CONFIGS, SD_TINY
from ldm.config import load_config
from ldm.models import build_models
from ldm.models.unet import UNetBlock
from ldm.train.fsdp import check_settings, reshard_after_forward, shard_units


def test_the_unet_is_sharded_block_by_block_and_the_text_encoder_layer_by_layer():
    cfg = load_config(SD_TINY)
    unet, _, text_encoder = build_models(cfg.model)
    units = shard_units(unet)
    assert units == [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    assert all(isinstance(u, UNetBlock) for u in units)
    # Left to the root unit: only the time embedding, the output layer and the text layout map.
    inside = {id(p) for u in units for p in u.parameters()}
    rest = {name.split(".")[0] for name, p in unet.named_parameters() if id(p) not in inside}
    assert rest == {"time_embed", "out", "layout"}
    text_units = shard_units(text_encoder)
    assert len(text_units) == cfg.model.text_encoder.layers
    frozen = text_encoder.requires_grad_(False)
    assert shard_units(frozen) == []  # nothing trained, nothing to shard as a unit


def test_sd15_has_25_units_the_largest_97m_parameters():
    import torch

    cfg = load_config(CONFIGS / "sd15.yaml")
    with torch.device("meta"):
        unet, _, _ = build_models(cfg.model)
    sizes = [sum(p.numel() for p in u.parameters()) for u in shard_units(unet)]
    assert len(sizes) == 25 and round(max(sizes) / 1e6) == 97  # the middle block (docs/training.md)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 859.5


@pytest.mark.parametrize("value, expected", [
    (None, True), ("true", True), ("false", False), ("FULL_SHARD", True), ("SHARD_GRAD_OP", False),
    ("NO_SHARD", False),
])
def test_reshard_after_forward_reads_accelerates_setting(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("FSDP_RESHARD_AFTER_FORWARD", raising=False)
    else:
        monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", value)
    assert reshard_after_forward() is expected


def test_unsupported_fsdp_settings_are_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS", raising=False)
    check_settings("bf16")
    check_settings("no")
    with pytest.raises(ValueError, match="mixed_precision=fp16 with FSDP: use bf16"):
        check_settings("fp16")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match="offload.*launch without --fsdp_offload_params"):
        check_settings("bf16")
