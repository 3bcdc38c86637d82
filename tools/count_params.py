#!/usr/bin/env python
"""Print the parameter counts of the networks a config describes (instant: built on the meta device).

    python tools/count_params.py configs/sd15.yaml configs/sd21.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.config import load_config  # noqa: E402
from ldm.models import count_parameters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config YAML files")
    args = parser.parse_args(argv)
    for path in args.configs:
        counts = count_parameters(load_config(path).model)
        print(path)
        for name, n in counts.items():
            print(f"  {name:<13} {n:>14,}  ({n / 1e6:.1f}M)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
