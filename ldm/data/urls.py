"""Shard URLs: paths, folders, index files, brace patterns and `pipe:` commands, expanded to the
list of `.tar` URLs a reader splits between its ranks and workers."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterable

from .sources import IMAGE_EXTS, image_ext


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard URLs from paths, brace patterns (`a-{000000..000009}.tar`), `pipe:` commands, folders,
    or index files.

    A folder stands for the `*.tar` files in it (sorted); a `.json` index written by `write_shards`
    for the shards it lists. Local paths must exist.
    """
    from webdataset.shardlists import expand_urls as expand_braces

    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    result: list[str] = []
    for item in items:
        item = str(item)
        if not item.startswith("pipe:") and "://" not in item and os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                files = glob.glob(os.path.join(item, "**", "*"), recursive=True)
                images = [p for p in files if image_ext(p) in IMAGE_EXTS]
                hint = (f"; it holds {len(images)} images: read them directly with data.source=folder, or pack "
                        "them with tools/make_shards.py --images") if images else ""
                raise ValueError(f"no *.tar shards in folder {item}{hint}")
            result += found
            continue
        if item.endswith(".json") and os.path.isfile(item):
            with open(item, encoding="utf-8") as f:
                shards = json.load(f).get("shards", [])
            if not shards:
                raise ValueError(f"index {item} lists no shards")
            item = [os.path.join(os.path.dirname(item), s["name"]) for s in shards]
            for url in item:
                if not os.path.isfile(url):
                    raise ValueError(f"shard {url} listed in the index does not exist")
            result += item
            continue
        for url in expand_braces(item):
            if not url.startswith("pipe:") and "://" not in url and not os.path.isfile(url):
                raise ValueError(f"shard {url} does not exist (from {item!r}); check data.urls")
            result.append(url)
    if not result:
        raise ValueError(f"no shards found in {urls!r}; check data.urls")
    return result
