#!/usr/bin/env python
"""Serve a model over the AUTOMATIC1111 HTTP API, with a web page at /.

    python tools/serve.py --ckpt runs/sd_tiny/model.safetensors            # http://127.0.0.1:7860
    python tools/serve.py --config configs/sd_tiny.yaml                    # random weights, for trying it out
    LDM_API_KEY=secret python tools/serve.py --ckpt model.safetensors --host 0.0.0.0

Needs the serve extra: pip install -e ".[serve]". See docs/serve.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import run_main  # noqa: E402
from ldm.serve.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
