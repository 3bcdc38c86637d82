"""`python tools/inpaint.py` = `ldm-inpaint` (ldm/cli/inpaint.py); needs the package installed: `pip install -e .`."""
from ldm.cli.inpaint import run
raise SystemExit(run())
