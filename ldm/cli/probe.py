"""Probe where a shapes model's prompt following breaks: text encoder, cross-attention, latent, loss.

    ldm-probe --ckpt runs/sd_tiny/model.safetensors
    ldm-probe --ckpt runs/sd_tiny/model.safetensors --only swap,attention --out probes.json
    ldm-probe --vae runs/vae_tiny/vae.safetensors      # the autoencoder alone (latent probe); with
                                                       # --ckpt, --vae swaps that VAE into the model

Prints, for each attribute of a caption (colour, shape, size, position, background):
  text       how far apart the text encoder puts captions differing only in it (relative to
             unrelated captions), and held-out accuracy of linear read-outs from its output;
  attention  per cross-attention layer, the weight each word puts on the object's grid cell
             against the rest of the image, at a noise level where the object is not yet visible
             (1.0: the word cannot say where to draw); --attention-png also draws the maps;
  latent     the detector on autoencoder reconstructions of every single-object scene;
  swap       denoising loss with the attribute swapped in the caption / with the true caption,
             per timestep (1.0: the U-Net ignores the word there);
  prior      the model's clean image from pure noise (the last timestep, where sampling starts):
             how much of the object the caption alone draws, and what share lands in its cell.
See ldm/eval/probes.py and docs/training.md ("The tiny run").
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from PIL import Image

from ..eval import probes
from ..eval.report import attention_image, save_figure
from .common import add_model_args, load_pipeline, run_main

PROBES = ("text", "attention", "latent", "swap", "prior")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PROBES), help=f"comma-separated subset of {', '.join(PROBES)}")
    parser.add_argument("--n", type=int, default=128, help="scenes per probe (default 128)")
    parser.add_argument("--t", type=int, default=800, help="timestep of the attention probe (default 800)")
    parser.add_argument("--attention-png", type=Path, default=None,
                        help="also draw the cross-attention maps of a few captions (layers x words) to this PNG")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    parser.add_argument("--resolution", type=int, default=32,
                        help="image size of the latent probe of --vae alone (default 32)")
    add_model_args(parser)  # its --vae alone (no --ckpt or --config): the latent probe of that VAE file
    args = parser.parse_args(argv)
    if args.vae and not args.ckpt and not args.config:
        from ..checkpoint import load_vae_file

        result = probes.reconstruction_adherence(load_vae_file(args.vae).eval(), args.resolution)
        print("latent: detector on reconstructions of every single-object scene")
        print("  " + "  ".join(f"{k} {v:.1%}" for k, v in result.items()))
        return 0
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    if not only or any(p not in PROBES for p in only):
        parser.error(f"--only takes a comma-separated subset of {', '.join(PROBES)} (got {args.only!r})")

    pipe = load_pipeline(args)
    out: dict[str, object] = {}
    if "text" in only:
        out["text_separation"] = probes.text_separation(pipe, n=args.n)
        out["text_readout"] = probes.linear_readout(pipe)
        print("text: distance of captions differing in one attribute / of unrelated captions")
        print("  " + "  ".join(f"{a} {v:.3f}" for a, v in out["text_separation"].items()))
        print("text: held-out accuracy of a linear read-out (features: last state, mean state, all states)")
        for feature, accs in out["text_readout"].items():
            print(f"  {feature:<5} " + "  ".join(f"{a} {v:.0%}" for a, v in accs.items()))
    if "attention" in only:
        out["attention_on_cell"] = probes.attention_on_cell(pipe, n=min(args.n, 64), t=args.t)
        print(f"attention at t={args.t}: weight on the object's cell / elsewhere, per layer and word")
        for layer, ratios in out["attention_on_cell"].items():
            print(f"  {layer.replace('.transformer_blocks.0.attn2', ''):<18} "
                  + "  ".join(f"{g} {v:.2f}" for g, v in ratios.items()))
    if args.attention_png:
        from ..data.shapes import parse_caption

        captions = ["a large red circle at the top left, on a white background",
                    "a small blue square in the center, on a black background",
                    "a large green triangle at the bottom right, on a gray background"]
        scenes = [parse_caption(c) for c in captions]
        tiles = []
        for t in (900, args.t, 500):
            maps = probes.cross_attention_maps(pipe, scenes, t)
            for b, c in enumerate(captions):
                words = probes.word_tokens(pipe, c)
                tiles.append(attention_image([(name, m[b]) for name, m in maps], words))
        width, height = max(t.width for t in tiles), sum(t.height + 6 for t in tiles)
        sheet = Image.new("RGB", (width, height), "white")
        y = 0
        for tile in tiles:
            sheet.paste(tile, (0, y))
            y += tile.height + 6
        save_figure(sheet, args.attention_png)
        print(f"wrote {args.attention_png} (t = 900, {args.t}, 500; three captions each)")
    if "latent" in only:
        out["reconstruction"] = probes.reconstruction_adherence(pipe.vae, pipe.defaults.height)
        print("latent: detector on reconstructions of every single-object scene")
        print("  " + "  ".join(f"{k} {v:.1%}" for k, v in out["reconstruction"].items()))
    if "swap" in only:
        out["swap_loss"] = probes.swap_loss(pipe, n=args.n)
        print("swap: loss with the attribute swapped / with the true caption, per timestep")
        for attr, per_t in out["swap_loss"].items():
            print(f"  {attr:<10} " + "  ".join(f"t{t} {v:.3f}" for t, v in per_t.items()))
    if "prior" in only:
        out["noise_prior"] = probes.noise_prior(pipe, n=min(args.n, 64))
        p = out["noise_prior"]
        print(f"prior: the clean image predicted from pure noise at t={p['t']}, from the caption alone")
        print(f"  contrast of the object's cell {p['contrast']:.2f} (0: nothing in place, 1: the object); "
              f"inkiest cell is the object's for {p['place_right']:.0%} of captions (11% at random)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


run = partial(run_main, main)  # the ldm-probe entry point

if __name__ == "__main__":
    sys.exit(run())
