"""`python tools/train_vae.py` = `ldm-train-vae` (ldm/cli/train_vae.py); needs the package installed: `pip install -e .`."""
from ldm.cli.train_vae import run
raise SystemExit(run())
