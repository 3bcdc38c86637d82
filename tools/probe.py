"""`python tools/probe.py` = `ldm-probe` (ldm/cli/probe.py); needs the package installed: `pip install -e .`."""
from ldm.cli.probe import run
raise SystemExit(run())
