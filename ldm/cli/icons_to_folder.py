"""Turn a freedesktop icon theme into a folder of captioned images (PNG + same-name .txt) to train on.

    apt-get install -y tango-icon-theme        # Debian/Ubuntu: 215 public-domain icons at 32 px
    python tools/icons_to_folder.py --theme /usr/share/icons/Tango --size 32x32 --out data/tango
    python tools/train_ldm.py configs/sd_tiny.yaml data.source=folder data.urls=data/tango

Each icon is captioned from its file name and its theme folder: `status/weather-severe-alert.png`
becomes "weather severe alert, status icon". Aliases (symbolic links to another icon) are left
out, so every image appears once, under its own name; so are non-square images (animation strips).
The PNG bytes are copied unchanged.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from functools import partial
from pathlib import Path

from PIL import Image

from .common import run_main

# Theme folder -> what an icon in it is (freedesktop icon naming specification contexts).
CONTEXTS = {
    "actions": "action", "animations": "animation", "apps": "application", "categories": "category",
    "devices": "device", "emblems": "emblem", "emotes": "emoticon", "intl": "flag", "mimetypes": "file type",
    "places": "place", "status": "status",
}


def caption(path: Path) -> str:
    """"x-office-document" in mimetypes/ -> "office document, file type icon"."""
    words = path.stem.replace("_", "-").split("-")
    if words[0] == "x" and len(words) > 1:  # MIME subtypes: x-office-..., application-x-...
        words = words[1:]
    words = [w for w in words if w != "x"]
    context = CONTEXTS.get(path.parent.name, path.parent.name)
    return f"{' '.join(words)}, {context} icon"


def icons(theme: Path, size: str) -> list[Path]:
    """The theme's PNGs at `size` (e.g. "32x32"), one per real file, sorted."""
    folder = theme / size
    if not folder.is_dir():
        sizes = sorted(p.name for p in theme.iterdir() if p.is_dir()) if theme.is_dir() else []
        raise ValueError(f"no {folder}: the theme has sizes {sizes or 'none (is it installed?)'}")
    return sorted(p for p in folder.rglob("*.png") if not p.is_symlink())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--theme", type=Path, default=Path("/usr/share/icons/Tango"), help="icon theme folder")
    parser.add_argument("--size", default="32x32", help="size folder of the theme (default 32x32)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; must be empty)")
    args = parser.parse_args(argv)

    found = icons(args.theme, args.size)
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} is not empty; choose a new folder")
    written = 0
    for path in found:
        with Image.open(path) as im:
            if im.width != im.height:
                continue
        target = args.out / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        target.with_suffix(".txt").write_text(caption(path) + "\n", encoding="utf-8")
        written += 1
    print(f"wrote {written} captioned icons to {args.out} (of {len(found)} PNGs in {args.theme / args.size})")
    return 0 if written else 1


run = partial(run_main, main)  # the ldm-icons-to-folder entry point

if __name__ == "__main__":
    sys.exit(run())
