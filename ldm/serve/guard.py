"""What every request passes before any route sees it: the API key and the body size limit.

The key is accepted as `Authorization: Bearer KEY`, as `X-API-Key: KEY`, or as the password of
HTTP Basic authentication (any user name), so that a browser opening the web page asks for it
once and sends it with every request the page makes. Bodies larger than the limit are refused
with 413 before they are read into memory, whether they announce their length or not.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The API key a request carries, from whichever header it uses."""
    if b"x-api-key" in headers:
        return headers[b"x-api-key"].decode("latin-1")
    scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


class Guard:
    """ASGI middleware: 401 without the right key (when one is set), 413 past `max_body` bytes."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int):
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None:
            key = presented_key(headers)
            if key is None or not secrets.compare_digest(key.encode(), self.api_key.encode()):
                return await _reply(send, 401, "a valid API key is required: send 'Authorization: Bearer KEY' "
                                    "or 'X-API-Key: KEY'", {"www-authenticate": 'Basic realm="ldm"'})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _reply(send, 413, self._too_large())
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, cutting the body off (and answering 413) once it passes the limit."""
        seen, over, started = 0, False, False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if over and not started:
                started = True
                return await _reply(send, 413, self._too_large())
            if not over:
                started = True
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _reply(send, 413, self._too_large())

    def _too_large(self) -> str:
        return (f"the request body is larger than {self.max_body // (1 << 20)} MiB; send smaller images "
                "(or start the server with a larger --max-body-mb)")


async def _reply(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
