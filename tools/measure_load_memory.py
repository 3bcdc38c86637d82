"""`python tools/measure_load_memory.py` = `ldm-measure-load-memory` (ldm/cli/measure_load_memory.py); needs the package installed: `pip install -e .`."""
from ldm.cli.measure_load_memory import run
raise SystemExit(run())
