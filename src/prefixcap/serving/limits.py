"""A request-body size limit that holds whatever the client claims.

The declared Content-Length is checked before any byte is read, and the bytes actually received
are counted as they stream in, so a chunked upload (no Content-Length) or a client whose header
lies is cut off at the limit too. Nothing over the limit is ever buffered.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefixcap.serving.errors import APIError


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        received = 0

        async def limited_receive() -> Message:
            # Raised from inside the endpoint's body read, so the app's error handlers answer it.
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(int(declared))
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(received, at_least=True)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, size: int, at_least: bool = False) -> APIError:
        return APIError(
            413,
            "too_large",
            f"request body of {'at least ' if at_least else ''}{size:,} bytes is over the "
            f"{self.max_bytes:,}-byte limit (--max-upload-mb)",
        )
