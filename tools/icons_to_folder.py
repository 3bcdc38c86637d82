"""`python tools/icons_to_folder.py` = `ldm-icons-to-folder` (ldm/cli/icons_to_folder.py); needs the package installed: `pip install -e .`."""
from ldm.cli.icons_to_folder import run
raise SystemExit(run())
