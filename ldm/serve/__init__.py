"""Serving: an HTTP API that AUTOMATIC1111 clients speak, a batching queue, and a web page.

`ldm-serve` is the command; `create_app(Server(catalog, settings))` builds the same app in a
program. FastAPI and uvicorn come with `pip install -e ".[serve]"`.
"""

from .a1111 import Limits
from .app import Server, ServeSettings, create_app
from .catalog import ModelCatalog, ModelEntry

__all__ = ["Limits", "ModelCatalog", "ModelEntry", "Server", "ServeSettings", "create_app"]
