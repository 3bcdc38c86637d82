"""`python tools/eval.py` = `ldm-eval` (ldm/cli/eval.py); needs the package installed: `pip install -e .`."""
from ldm.cli.eval import run
raise SystemExit(run())
