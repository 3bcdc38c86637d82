"""`python tools/convert.py` = `ldm-convert` (ldm/cli/convert.py); needs the package installed: `pip install -e .`."""
from ldm.cli.convert import run
raise SystemExit(run())
