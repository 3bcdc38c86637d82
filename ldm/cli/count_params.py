"""Print the parameter counts of the networks a config describes (instant: built on the meta device).

    ldm-count-params configs/sd15.yaml configs/sd21.yaml
    ldm-count-params sd15 sd21 sd_tiny                        # shipped configs by name
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from ..config import load_config
from ..models import count_parameters
from .common import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config YAML files or names of shipped configs")
    args = parser.parse_args(argv)
    for path in args.configs:
        counts = count_parameters(load_config(path).model)
        print(path)
        for name, n in counts.items():
            print(f"  {name:<13} {n:>14,}  ({n / 1e6:.1f}M)")
    return 0


run = partial(run_main, main)  # the ldm-count-params entry point

if __name__ == "__main__":
    sys.exit(run())
