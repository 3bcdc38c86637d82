"""`python tools/serve.py` = `ldm-serve` (ldm/cli/serve.py); needs the package installed: `pip install -e .`."""
from ldm.cli.serve import run
raise SystemExit(run())
