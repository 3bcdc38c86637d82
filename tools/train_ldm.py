"""`python tools/train_ldm.py` = `ldm-train` (ldm/cli/train.py); needs the package installed: `pip install -e .`."""
from ldm.cli.train import run
raise SystemExit(run())
