"""Encode image shards once into latent shards, so stage-2 training skips the VAE encoder.

    python tools/cache_latents.py --vae runs/vae_small/vae.safetensors --shards data/train --out data/latents/train
    python tools/train_ldm.py configs/sd_small.yaml data.source=latents data.urls=data/latents

--vae takes any VAE: a stage-1 file, a whole model in any format (an original SD 1.x/2.x
.safetensors or .ckpt, a diffusers folder; its VAE is used), a standalone SD VAE file
(vae-ft-mse-840000-ema-pruned.safetensors) or a diffusers VAE folder.

With --text-from MODEL (any format: ldm, original single file, diffusers folder) the (frozen) text
encoder of that model also embeds every caption; the trainer then uses the cached embeddings when
the model's text encoder is frozen.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from ..devices import pick_device
from .checks import positive_int
from .common import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True,
                        help="a VAE (stage-1 file, SD VAE file or diffusers folder) or a whole model in any format")
    parser.add_argument("--shards", required=True, help="image shards: folder, file, brace pattern or pipe: URL")
    parser.add_argument("--out", required=True, help="output prefix, e.g. data/latents/train")
    parser.add_argument("--resolution", type=positive_int, required=True,
                        help="training resolution (images are resized/cropped)")
    parser.add_argument("--text-from", default=None,
                        help="model (file or diffusers folder, any format) whose text encoder embeds the captions too")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--max-count", type=positive_int, default=10_000, help="samples per shard")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from ..convert.vae_file import vae_from_file
    from ..data.latents import cache_latents
    from ..pipeline import LDMPipeline

    device = pick_device(args.device)
    text_encoder = LDMPipeline.load(args.text_from).text_encoder if args.text_from else None
    summary = cache_latents(
        args.shards, args.out, vae_from_file(args.vae), resolution=args.resolution, batch_size=args.batch_size,
        num_workers=args.num_workers, text_encoder=text_encoder, device=device, max_count=args.max_count,
        overwrite=args.overwrite,
    )
    print(summary)
    return 0


run = partial(run_main, main)  # the ldm-cache-latents entry point

if __name__ == "__main__":
    sys.exit(run())
