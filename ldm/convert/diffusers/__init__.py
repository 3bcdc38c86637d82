"""diffusers Stable Diffusion folders, in and out.

- `keys`: each of our tensors <-> its diffusers name(s), derived from our configs, applied strictly.
- `configs`: our configs <-> the folder's `config.json` files.
- `folder`: whole folders: `read_diffusers(folder) -> ModelState`, `write_diffusers(state, folder)`,
  the tokenizer files and `model_index.json`.

`LDMPipeline.from_diffusers(folder)` and `pipe.save_diffusers(folder)` are the usual way in and out.
"""

from .configs import (
    diffusers_configs,
    scheduler_config_from_diffusers,
    scheduler_config_to_diffusers,
    text_config_from_diffusers,
    text_config_to_diffusers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from .folder import (
    EXTRA_FILE,
    LDM_CONFIG_KEY,
    WEIGHT_STEMS,
    read_component_weights,
    read_diffusers,
    read_diffusers_config,
    write_diffusers,
    write_tokenizer,
)
from .keys import (
    KeyRule,
    current_vae_names,
    exported_text_layers,
    from_diffusers_state,
    text_rules,
    to_diffusers_state,
    unet_module_map,
    unet_rules,
    vae_module_map,
    vae_rules,
)

__all__ = [
    "EXTRA_FILE",
    "LDM_CONFIG_KEY",
    "WEIGHT_STEMS",
    "KeyRule",
    "current_vae_names",
    "diffusers_configs",
    "exported_text_layers",
    "from_diffusers_state",
    "read_component_weights",
    "read_diffusers",
    "read_diffusers_config",
    "scheduler_config_from_diffusers",
    "scheduler_config_to_diffusers",
    "text_config_from_diffusers",
    "text_config_to_diffusers",
    "text_rules",
    "to_diffusers_state",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_module_map",
    "unet_rules",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_module_map",
    "vae_rules",
    "write_diffusers",
    "write_tokenizer",
]
