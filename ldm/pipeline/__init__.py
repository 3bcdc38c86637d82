"""The pipeline: a whole model that turns prompts (and images, and masks) into images, and loads and saves itself.

- `ldm_pipeline`: `LDMPipeline`: the networks, `generate`, `img2img`, `inpaint`.
- `stages`: the stages those methods share (checks, conditions, noise, sampling, output).
- `upscale`: an upscaler model's `upscale`; `tiles`: its tiles and memory check; `hires`: generate's hires fix.
- `loading`: `load` (any format, by path), `from_config`, `from_checkpoint`, `from_single_file`,
  `from_diffusers`, `load_vae`, `save*`.
- `source`: `ModelSource`, where a pipeline's weights came from (what its PNGs record).
- `files`: `load_model` / `save_model` in any format, by path (`check_model_kind`: text-to-image or upscaler).
"""

from .files import check_model_kind, load_model, save_model
from .ldm_pipeline import LDMPipeline
from .stages import MAX_SEED

__all__ = ["LDMPipeline", "MAX_SEED", "check_model_kind", "load_model", "save_model"]
