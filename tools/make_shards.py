"""`python tools/make_shards.py` = `ldm-make-shards` (ldm/cli/make_shards.py); needs the package installed: `pip install -e .`."""
from ldm.cli.make_shards import run
raise SystemExit(run())
