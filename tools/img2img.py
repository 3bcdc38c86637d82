"""`python tools/img2img.py` = `ldm-img2img` (ldm/cli/img2img.py); needs the package installed: `pip install -e .`."""
from ldm.cli.img2img import run
raise SystemExit(run())
