"""`python tools/bench.py` = `ldm-bench` (ldm/cli/bench.py); needs the package installed: `pip install -e .`."""
from ldm.cli.bench import run
raise SystemExit(run())
