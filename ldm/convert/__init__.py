"""Checkpoints from elsewhere: original Stable Diffusion single files (and diffusers folders)."""

from .single_file import build_pipeline_from_state, detect_config, ema_key, load_single_file, read_checkpoint

__all__ = ["build_pipeline_from_state", "detect_config", "ema_key", "load_single_file", "read_checkpoint"]
