"""`python tools/cache_latents.py` = `ldm-cache-latents` (ldm/cli/cache_latents.py); needs the package installed: `pip install -e .`."""
from ldm.cli.cache_latents import run
raise SystemExit(run())
