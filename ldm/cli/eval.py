"""Evaluate a checkpoint: held-out denoising loss and prompt adherence on the built-in shapes data
(an upscaler: held-out loss, and PSNR and sharpness against bicubic).

    ldm-eval --ckpt runs/sd_tiny/model.safetensors
    ldm-eval --ckpt runs/sd_tiny/model.safetensors --n 512 --cfg 7.5 --out metrics.json
    ldm-eval --ckpt runs/sd_tiny/model.safetensors --report outputs/eval   # + confusion matrices
    ldm-eval --ckpt runs/sr_tiny/model.safetensors --n 64 --max-objects 4 --combinations all --grid sr.png

Adherence: for held-out captions ("a small red circle at the top left, on a white background"),
the fraction of generated images whose detected colour / shape / size / position / count /
background match the caption, and "all" (every one of them). The detector is exact on rendered
scenes. Two sets of captions by default (--combinations): "seen" avoids the attribute pairs of
ldm.data.shapes.HELDOUT_PAIRS, "unseen" holds one in every object; a model trained with
data.shapes_combinations=seen never read those pairs, so "unseen" measures whether it composes
words. "all" is the held-out stream without either restriction.

An upscaler upscales the held-out scenes' downscales by its factor (the first set of
--combinations; empty prompt, seeds --seed + k, its default noise level) and is scored against
bicubic (ldm/eval/superres.py: PSNR and the high-frequency energy ratio); --grid writes the first
rows of low-res / bicubic / model / truth.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..eval.adherence import ATTRIBUTES, confusion, summarize
from ..eval.heldout import generate_and_detect, heldout_items, heldout_loss
from ..eval.superres import comparison_grid, superres_scores, upscale_comparison
from ..images import save_png
from .checks import check_output_file, positive_int
from .common import add_model_args, load_pipeline, run_main

SETS = ("seen", "unseen", "all")


def set_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(s not in SETS for s in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(SETS)} (got {text!r})")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=256, help="held-out captions per set of combinations (default 256)")
    parser.add_argument("--combinations", type=set_list, default=["seen", "unseen"], metavar="SETS",
                        help="caption sets to score, comma-separated: seen, unseen, all (default seen,unseen)")
    parser.add_argument("--resolution", type=positive_int, default=None, help="image size (default: the model's sample size)")
    parser.add_argument("--max-objects", type=positive_int, default=1, help="objects per held-out scene (default 1)")
    parser.add_argument("--cfg", type=float, default=7.5, help="guidance scale for adherence (default 7.5)")
    parser.add_argument("--steps", type=positive_int, default=20, help="sampling steps for adherence or upscaling (default 20)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--skip-loss", action="store_true", help="only prompt adherence")
    parser.add_argument("--skip-adherence", action="store_true", help="only the held-out loss")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="also write confusion matrices (what was drawn when X was asked for) as "
                             "DIR/confusion-<set>.png, and every (prompt, detected) pair as DIR/detections-<set>.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics as JSON here")
    parser.add_argument("--grid", type=Path, default=None,
                        help="upscalers: write low-res / bicubic / model / truth rows of the first 4 images here")
    add_model_args(parser)
    args = parser.parse_args(argv)
    for flag, path in (("--out", args.out), ("--grid", args.grid)):
        if path:
            check_output_file(path, flag)  # before the evaluation, not after it

    pipe = load_pipeline(args, kind=None)
    upscaler = pipe.model_config.is_upscaler
    if args.grid and not upscaler:
        raise ValueError("--grid compares upscalers with bicubic; this is a text-to-image model")
    resolution = args.resolution or pipe.defaults.height
    sets = args.combinations[:1] if upscaler else args.combinations  # an upscaler reads no captions' pairs
    items = {s: heldout_items(args.n, resolution, seed=args.seed, max_objects=args.max_objects, combinations=s)
             for s in sets}
    metrics: dict[str, float] = {}
    if not args.skip_loss:
        first = sets[0]
        loss = heldout_loss(pipe, items[first], batch_size=args.batch_size, seed=args.seed)
        metrics.update(loss)
        for key, value in loss.items():
            print(f"{key:<12} {value:.4f}   ({first} captions)")
    if upscaler:
        comparison = upscale_comparison(pipe, torch.stack([it["image"] for it in items[sets[0]]]),
                                        steps=args.steps, seed=args.seed, batch_size=args.batch_size)
        scores = superres_scores(comparison)
        metrics.update(scores)
        for key, value in scores.items():
            print(f"{key:<18} {value:.4f}")
        if args.grid:
            save_png(comparison_grid(comparison), args.grid)
            print(f"wrote {args.grid}")
    elif not args.skip_adherence:
        table = {}
        for name, its in items.items():
            pairs = generate_and_detect(pipe, [it["caption"] for it in its], resolution=resolution, cfg=args.cfg,
                                        steps=args.steps, sampler=args.sampler, seed=args.seed,
                                        batch_size=args.batch_size)
            table[name] = summarize(pairs)
            metrics.update({f"adherence_{name}_{k}": v for k, v in table[name].items() if k != "n"})
            if args.report:
                write_report(args.report, name, pairs, f"{args.ckpt or args.config}: {name} combinations, "
                                                       f"n={len(pairs)}, cfg {args.cfg}")
        print(f"\n{'adherence':<12}" + "".join(f"{s:>9}" for s in table))
        for attr in ATTRIBUTES:
            print(f"{attr:<12}" + "".join(f"{table[s][attr]:>9.1%}" for s in table))
        if args.report:
            print(f"wrote confusion matrices and detections to {args.report}")
    if args.out:
        write_text_atomic(args.out, json.dumps(metrics, indent=2))
        print(f"wrote {args.out}")
    return 0


def write_report(folder: Path, name: str, pairs: list, title: str) -> None:
    """DIR/confusion-<name>.png and DIR/detections-<name>.jsonl (one {"prompt", "drawn"} per image)."""
    from ..eval.report import confusion_image, save_figure

    save_figure(confusion_image(confusion(pairs), title), folder / f"confusion-{name}.png")
    lines = [json.dumps({"prompt": want.caption(), "drawn": got.caption()}) for want, got in pairs]
    write_text_atomic(folder / f"detections-{name}.jsonl", "\n".join(lines) + "\n")


run = partial(run_main, main)  # the ldm-eval entry point

if __name__ == "__main__":
    sys.exit(run())
