"""Pack images and captions into webdataset shards for training.

    # a folder of images with sidecar captions (photo.jpg + photo.txt), searched recursively
    python tools/make_shards.py --images data/raw --out data/shards/train --max-size 500
    # a JSONL or CSV table of image paths (relative to the table) and captions
    python tools/make_shards.py --table data/captions.jsonl --image-key file --caption-key text --out data/shards/train
    # the built-in shapes dataset
    python tools/make_shards.py --shapes 10000 --resolution 64 --seed 0 --out data/shapes/train/shapes

Writes {out}-000000.tar, {out}-000001.tar, ... and {out}-index.json (shards and sample counts);
--out DIR/ (or an existing folder) writes DIR/DIR-000000.tar, ... inside it.
Images without captions and unreadable images are skipped and counted. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from ..data.sources import folder_samples, list_images, read_table, shapes_samples, table_samples
from ..data.writer import write_shards
from .checks import positive_int
from .common import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images (jpg/jpeg/png/webp) with same-stem .txt captions")
    source.add_argument("--table", type=Path, help="JSONL, CSV or TSV file with an image path and a caption per row")
    source.add_argument("--shapes", type=positive_int, metavar="N",
                        help="write N samples of the built-in shapes dataset")
    parser.add_argument("--out", required=True, help="shard prefix: writes OUT-000000.tar, ... and OUT-index.json "
                                                      "(a folder, OUT/: FOLDER-000000.tar, ... inside it)")
    parser.add_argument("--max-count", type=positive_int, default=10_000,
                        help="samples per shard at most (default 10000)")
    parser.add_argument("--max-size", type=float, default=None,
                        help="shard size in MB (10^6 bytes) at most (default: no bound; 100-1000 is typical)")
    parser.add_argument("--image-key", default="image", help="--table column with the image path (default image)")
    parser.add_argument("--caption-key", default="caption", help="--table column with the caption (default caption)")
    parser.add_argument("--allow-empty-captions", action="store_true",
                        help="keep images without a caption (stored with an empty caption) instead of skipping them")
    parser.add_argument("--resize", type=positive_int, default=None, metavar="PX",
                        help="shrink images whose shorter side exceeds PX to PX (re-encodes them; default: keep bytes)")
    parser.add_argument("--resolution", type=positive_int, default=64, help="--shapes image size (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="--shapes seed (default 0)")
    parser.add_argument("--split", default="train", help="--shapes split: train or heldout (default train)")
    parser.add_argument("--max-objects", type=positive_int, default=1,
                        help="--shapes objects per scene at most (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards with the same --out prefix")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    image_options = {"allow_empty_captions": args.allow_empty_captions, "resize": args.resize}
    if args.images is not None:
        total = len(list_images(args.images))
        samples = folder_samples(args.images, **image_options)
    elif args.table is not None:
        total = len(read_table(args.table))
        samples = table_samples(args.table, image_key=args.image_key, caption_key=args.caption_key, **image_options)
    else:
        total = args.shapes
        samples = shapes_samples(args.shapes, resolution=args.resolution, seed=args.seed, split=args.split,
                                 max_objects=args.max_objects)

    summary = write_shards(samples, args.out, max_count=args.max_count, max_size_mb=args.max_size, total=total,
                           progress=not args.quiet, overwrite=args.overwrite)
    print(summary)
    if summary.written == 0:
        print("error: no samples written; see the skip reasons above", file=sys.stderr)
        return 1
    return 0


run = partial(run_main, main)  # the ldm-make-shards entry point

if __name__ == "__main__":
    sys.exit(run())
