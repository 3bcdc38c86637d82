"""The command-line tools: one module per tool, each `main(argv)` plus a `run` entry point.

Installed as `ldm-txt2img`, `ldm-img2img`, `ldm-inpaint`, `ldm-upscale`, `ldm-convert`, `ldm-eval`, `ldm-bench`,
`ldm-count-params`, `ldm-measure-load-memory`, `ldm-train`, `ldm-train-vae`,
`ldm-make-shards`, `ldm-cache-latents` and `ldm-icons-to-folder` (`[project.scripts]` in pyproject.toml); the same
tools run as `python -m ldm.cli.<tool>` and as `python tools/<tool>.py`. What they share (error
reporting, model and sampling arguments, writing PNGs) is `ldm.cli.common`.
"""

from ..devices import pick_device
from .common import run_main

__all__ = ["pick_device", "run_main"]
