"""Serve a model over the AUTOMATIC1111 HTTP API, with a web page at /.

    ldm-serve --ckpt runs/sd_tiny/model.safetensors            # http://127.0.0.1:7860
    ldm-serve --config configs/sd_tiny.yaml                    # random weights, for trying it out
    LDM_API_KEY=secret ldm-serve --ckpt model.safetensors --host 0.0.0.0

Needs the serve extra: pip install -e ".[serve]". See docs/serve.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from functools import partial
from pathlib import Path

import torch

from ..config import load_config
from ..devices import pick_device, pick_dtype
from ..pipeline import LDMPipeline
from ..serve.a1111 import Limits
from ..serve.app import Server, ServeSettings, create_app
from ..serve.catalog import ModelCatalog, ModelEntry, file_entry, folder_entries
from .common import add_model_args, run_main
from .model_choice import default_model

API_KEY_ENV = "LDM_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Serve a model over the AUTOMATIC1111 HTTP API, with a web page at /.",
        epilog="example: ldm-serve --ckpt runs/sd_tiny/model.safetensors  (then open http://127.0.0.1:7860)",
    )
    add_model_args(parser)
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="also offer every model under this folder: .safetensors and .ckpt files, diffusers "
                             "folders (switch with /sdapi/v1/options)")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    net.add_argument("--api-key", default=None,
                     help=f"key every request must carry (default: ${API_KEY_ENV}); required to bind a non-local address")
    queue = parser.add_argument_group("queue")
    queue.add_argument("--max-batch", type=int, default=8,
                       help="pictures that share one sampler loop (default 8; 1 turns batching off)")
    queue.add_argument("--max-queue", type=int, default=64,
                       help="pictures that may wait; more requests get 429 with Retry-After (default 64)")
    queue.add_argument("--batch-wait", type=float, default=None,
                       help="seconds a batch that is not full waits for more requests, from its first one's "
                            "arrival (default: a tenth of the recent batches' duration; 0: never)")
    queue.add_argument("--preview-every", type=float, default=1.0,
                       help="seconds between live previews of one request (default 1)")
    limits = parser.add_argument_group("limits per request")
    limits.add_argument("--max-size", type=int, default=None,
                        help="largest width or height (default: the largest, up to 2048, at which --max-batch "
                             "pictures fit in memory in one U-Net call)")
    limits.add_argument("--max-steps", type=int, default=150, help="most sampling steps (default 150)")
    limits.add_argument("--max-images", type=int, default=16, help="most pictures, batch_size x n_iter (default 16)")
    limits.add_argument("--max-body-mb", type=int, default=64, help="largest request body in MiB (default 64)")
    parser.add_argument("--outdir", type=Path, default=None,
                        help="where requests with save_images=true write PNGs (default: such requests are refused)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def catalog_from_args(args: argparse.Namespace) -> ModelCatalog:
    """The models --ckpt (with its --config, --set and --prediction-type hints), --config alone
    (random weights) and --models-dir name, loaded on the chosen device and dtype with --vae in place
    of their own VAEs. With none of them: $LDM_CHECKPOINT, else the README's trained model."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.overrides and not args.config:
        raise SystemExit("error: --set overrides apply to --config (random weights, or the architecture given with "
                         "--ckpt); a model file carries its own config")

    def loader(config=None, prediction_type=None):
        def load(path: Path) -> LDMPipeline:
            pipe = LDMPipeline.load(path, config=config, prediction_type=prediction_type, vae=args.vae, device=device,
                                    dtype=dtype)
            return pipe.set_attention_backend(args.attention)
        return load

    entries: list[ModelEntry] = []
    ckpt = args.ckpt
    if ckpt is None and args.config is None and args.models_dir is None:
        ckpt, why = default_model()
        print(f"note: serving the {why}", file=sys.stderr)
    if ckpt:
        config = load_config(args.config, args.overrides) if args.config else None
        entries.append(file_entry(ckpt, loader(config, args.prediction_type), config=config,
                                  prediction_type=args.prediction_type))
    elif args.config:
        cfg = load_config(args.config, args.overrides)
        print(f"note: {args.config} is built with random weights; expect noise-like images", file=sys.stderr)

        def load_random() -> LDMPipeline:
            pipe = LDMPipeline.from_config(cfg, device=device, dtype=dtype)
            if args.vae:
                pipe.load_vae(args.vae)
            return pipe.set_attention_backend(args.attention)

        title = f"{Path(args.config).stem} (random weights)"
        entries.append(ModelEntry(title=title, filename=str(args.config), load=load_random, cfg=cfg,
                                  config=str(args.config)))
    if args.models_dir:
        entries += [e for e in folder_entries(args.models_dir, loader()) if e.filename != str(ckpt)]
    if not entries:
        raise SystemExit(f"error: no model in --models-dir {args.models_dir}; pass --ckpt MODEL (an ldm or original "
                         ".safetensors / .ckpt, or a diffusers folder), or --config CONFIG.yaml (random weights)")
    return ModelCatalog(entries)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        raise SystemExit(f"error: --host {args.host} is reachable from other machines; set --api-key KEY "
                         f"(or ${API_KEY_ENV}) so that only clients with the key get in")
    for name in ("max_batch", "max_queue", "max_size", "max_steps", "max_images", "max_body_mb"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if (args.batch_wait is not None and args.batch_wait < 0) or args.preview_every < 0:
        raise SystemExit("error: --batch-wait and --preview-every must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    import uvicorn  # the serve extra; imported late so --help works without it

    settings = ServeSettings(
        max_batch=args.max_batch, max_queue=args.max_queue, batch_wait=args.batch_wait, api_key=api_key,
        max_body_mb=args.max_body_mb,
        preview_every=args.preview_every, outdir=args.outdir,
        limits=Limits(max_size=args.max_size, max_steps=args.max_steps, max_images=args.max_images),
    )
    server = Server(catalog_from_args(args), settings)
    print(f"loading {server.catalog.current} ...", file=sys.stderr)
    server.start()
    print(f"serving {server.catalog.current} on http://{args.host}:{args.port}: up to {server.images_per_call} "
          f"pictures per U-Net call, sizes up to {settings.limits.max_size} px; Ctrl+C stops", file=sys.stderr)
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        server.stop()
    return 0


run = partial(run_main, main)  # the ldm-serve entry point

if __name__ == "__main__":
    sys.exit(run())
