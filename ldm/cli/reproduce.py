"""`--from-png IMAGE`: make an image again from the settings its PNG records, ours (bit for bit, with
the model, LoRAs and embeddings it records) or AUTOMATIC1111's (the same settings), under any flag
given beside it.

The sampling flags default to what the PNG says; a flag on the command line wins. Without --ckpt
and --config the model the PNG records is used when it is here (see `model_choice`); whichever
model is used, a note says when it is not the one the image was made with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..options import SamplingOptions
from ..pipeline import LDMPipeline
from ..png_settings import A1111_HASH_DIGITS, PngSettings, read_png_settings


class _Unset:
    """Marks a sampling flag not given on the command line."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()


def add_from_png_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-png", type=Path, default=None, metavar="IMAGE",
                        help="take the prompt and settings (and, without --ckpt, the model) from a PNG written by "
                             "these tools, or by AUTOMATIC1111; flags given beside it win")


def parse_noting_given(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace,
                                                                                          set[str]]:
    """Parse `argv`; also the names of the `SamplingOptions` flags given on the command line.

    argparse leaves alone an attribute the namespace already has: parsed again into a namespace
    whose sampling fields start UNSET, the fields still UNSET were not given."""
    args = parser.parse_args(argv)
    names = SamplingOptions.names()
    marked = parser.parse_args(argv, argparse.Namespace(**{name: UNSET for name in names}))
    return args, {name for name in names if hasattr(args, name) and getattr(marked, name) is not UNSET}


def apply_png_settings(args: argparse.Namespace, given: set[str], path: Path) -> PngSettings:
    """Set every sampling field the tool has (a flag of its name) and the command line did not give
    to the value the PNG at `path` records; report A1111 fields that have no equivalent here."""
    png = read_png_settings(path)
    for name, value in png.options.to_dict().items():
        if hasattr(args, name) and name not in given and name != "num_images" and value is not None:
            setattr(args, name, value)
    if png.ignored:
        fields = ", ".join(f"{label}: {value}" for label, value in png.ignored.items())
        print(f"note: {path} also says {fields}; these have no equivalent here and are not used", file=sys.stderr)
    if png.source == "ldm":
        _recorded_adapters(args, png, path)
    if png.source == "a1111":
        print(f"note: {path} was made by AUTOMATIC1111: same settings, but its noise came from another random "
              "number generator, so the image will differ", file=sys.stderr)
    return png


def _recorded_adapters(args: argparse.Namespace, png: PngSettings, path: Path) -> None:
    """Without --lora and --embedding flags, the LoRAs (at their scales) and embeddings the image was
    made with, where their files are here; a note names the ones that are not."""
    if getattr(args, "lora", None) == [] and png.model.get("loras"):
        for lora in png.model["loras"]:
            if lora.get("path") and Path(lora["path"]).is_file():
                args.lora.append(f"{lora['path']}:{lora['scale']}")
            else:
                print(f"note: {path} was made with LoRA {lora.get('name')} at {lora.get('scale')} "
                      f"({lora.get('path')}), which is not here: the image will differ; --lora FILE:SCALE applies it",
                      file=sys.stderr)
    if getattr(args, "embedding", None) == [] and png.model.get("embeddings"):
        for emb in png.model["embeddings"]:
            if emb.get("path") and Path(emb["path"]).is_file():
                args.embedding.append(emb["path"])
            else:
                print(f"note: {path} was made with the embedding {emb.get('token')} ({emb.get('path')}), which is "
                      "not here: the image will differ; --embedding FILE adds it", file=sys.stderr)


def recorded_model(png: PngSettings | None, path: Path | None) -> tuple[dict | None, str | None]:
    """The model record `load_pipeline` may use: ours only (A1111's names a file by name and hash alone)."""
    if png is None or png.source != "ldm":
        return None, None
    return png.model, str(path)


def check_model(png: PngSettings, pipe: LDMPipeline, path: Path) -> None:
    """Say when the model or the runtime differs from the ones the image was made with."""
    source = pipe.source
    ours = source.sha256 if source is not None else None
    theirs = png.model.get("sha256") or png.model.get("hash")
    name = png.model.get("name", "its model")
    if theirs and ours and not ours.startswith(theirs[:A1111_HASH_DIGITS]) and len(theirs) >= A1111_HASH_DIGITS:
        print(f"note: {path} was made with {name} (hash {theirs[:A1111_HASH_DIGITS]}), not this model "
              f"({source.name}, {ours[:A1111_HASH_DIGITS]}): the image will differ", file=sys.stderr)
    made_on = (png.runtime.get("device"), png.runtime.get("dtype"))
    here = (pipe.device.type, str(pipe.dtype).removeprefix("torch."))
    if png.source == "ldm" and all(made_on) and (made_on[0].split(":")[0], made_on[1]) != here:
        print(f"note: {path} was made on {made_on[0]} in {made_on[1]}, this runs on {here[0]} in {here[1]}: expect "
              "differences in the last bits", file=sys.stderr)
