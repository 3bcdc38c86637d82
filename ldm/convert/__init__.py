"""Checkpoints from elsewhere, in and out: original single files and diffusers folders.

Every reader returns a `ldm.build.ModelState` (the config and one state dict per network) and every
writer takes one; none of them builds networks or a pipeline (`LDMPipeline.from_single_file`,
`from_diffusers` and `ldm.pipeline.load_model` assemble). `formats` names the formats and tells
them apart.
"""

from .single_file import detect_config, ema_key, read_checkpoint, read_single_file

__all__ = ["detect_config", "ema_key", "read_checkpoint", "read_single_file"]
