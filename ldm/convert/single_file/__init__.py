"""Original Stable Diffusion single-file checkpoints (`.safetensors`, `.ckpt`), in and out.

Three steps in, each usable on its own:

- `read_checkpoint(path)` (`reader`): the file's tensors, memory-mapped (no copy in RAM). Pickles
  are opened with `weights_only=True` only, unless the caller says it trusts the file.
- `detect_config(state_dict)` (`detect`): the architecture, read from tensor shapes, with the family
  conventions for what shapes cannot tell (head counts, noise schedule, latent scale; the x4
  upscaler's in `upscaler`).
- `read_single_file(path)` (`load`): sorts every tensor of the file into network weights,
  noise-schedule buffers, EMA copies and training leftovers, handles each kind explicitly, and
  returns a `ModelState` (config + network states) that `LDMPipeline.from_single_file` builds on
  the meta device: no random initialisation, no second copy of the weights.

Out: `write_single_file(state, path)` (`write`) adds the schedule buffers the original code expects.
"""

from .detect import detect_config
from .load import ema_key, read_single_file, read_single_file_config
from .reader import PICKLE_SUFFIXES, read_checkpoint, read_weights_file
from .write import schedule_buffers, single_file_tensors, write_single_file

__all__ = [
    "PICKLE_SUFFIXES",
    "detect_config",
    "ema_key",
    "read_checkpoint",
    "read_single_file",
    "read_single_file_config",
    "read_weights_file",
    "schedule_buffers",
    "single_file_tensors",
    "write_single_file",
]
