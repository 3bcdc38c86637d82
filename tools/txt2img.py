"""`python tools/txt2img.py` = `ldm-txt2img` (ldm/cli/txt2img.py); needs the package installed: `pip install -e .`."""
from ldm.cli.txt2img import run
raise SystemExit(run())
