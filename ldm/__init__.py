"""ldm: latent text-to-image diffusion.

    from ldm import LDMPipeline
    pipe = LDMPipeline.from_checkpoint("model.safetensors")
    images = pipe.generate("a red circle", seed=0)
"""

from .config import Config, ModelConfig, load_config

__version__ = "0.1.0"
__all__ = ["LDMPipeline", "SamplingOptions", "Config", "ModelConfig", "load_config", "__version__"]


def __getattr__(name: str):
    # The pipeline pulls in torch, transformers and every model; import it on first use only.
    if name == "LDMPipeline":
        from .pipeline import LDMPipeline

        return LDMPipeline
    if name == "SamplingOptions":
        from .options import SamplingOptions

        return SamplingOptions
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
