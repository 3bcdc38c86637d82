"""`python tools/bench_serve.py` = `ldm-bench-serve` (ldm/cli/bench_serve.py); needs the package installed: `pip install -e .`."""
from ldm.cli.bench_serve import run
raise SystemExit(run())
