"""`python tools/upscale.py` = `ldm-upscale` (ldm/cli/upscale.py); needs the package installed: `pip install -e .`."""
from ldm.cli.upscale import run
raise SystemExit(run())
