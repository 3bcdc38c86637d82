"""`python tools/count_params.py` = `ldm-count-params` (ldm/cli/count_params.py); needs the package installed: `pip install -e .`."""
from ldm.cli.count_params import run
raise SystemExit(run())
