"""The image tools' LoRA and embedding flags: `--lora FILE[:SCALE]` and `--embedding FILE`, applied to a loaded pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..pipeline import LDMPipeline


def add_adapter_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="apply a LoRA (kohya/A1111 or diffusers layout) at SCALE (default 1); repeatable")
    group.add_argument("--embedding", action="append", default=[], metavar="FILE",
                       help="add a textual-inversion embedding, used in prompts by its file name; repeatable")


def apply_adapters(pipe: LDMPipeline, args: argparse.Namespace) -> LDMPipeline:
    """Load the embeddings and LoRAs the flags name; LoRAs are fused (merged into the weights), so
    sampling runs at the plain speed."""
    for path in args.embedding:
        print(f"embedding {pipe.load_textual_inversion(path)!r} from {path}", file=sys.stderr)
    for spec in args.lora:
        path, scale = parse_lora_spec(spec)
        print(f"LoRA {pipe.load_lora(path, scale)!r} from {path} at scale {scale:g}", file=sys.stderr)
    if args.lora:
        pipe.fuse_lora()
    return pipe


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`FILE` or `FILE:SCALE` -> (path, scale); a colon not followed by a number is part of the path."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0
