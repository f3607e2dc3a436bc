"""Limits on what one client can make the server hold: body bytes, and time to send a request.

The body limit holds whatever the client claims: the declared Content-Length is checked before any
byte is read, and the bytes actually received are counted as they stream in, so a chunked upload
(no Content-Length) or a client whose header lies is cut off at the limit too. Nothing over the
limit is ever buffered.

The time limits stop slow clients (slowloris) from holding connections forever: request headers
must arrive within the read timeout (`HeaderTimeoutH11Protocol`, at the connection), and then the
body within the read timeout again (`RequestBodyLimits`, in the app, which answers 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from prefixcap.serving.errors import APIError


class RequestBodyLimits:
    """Refuse request bodies over `max_bytes` (413) or not received within `read_timeout` seconds
    of the request's headers (408). Raised from inside the endpoint's body read, so that the app's
    error handlers answer them."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float):
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        received, complete = 0, False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body only a disconnect can come, whenever it likes
                return await receive()
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(int(declared))
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise APIError(
                    408,
                    "timeout",
                    f"the request body did not arrive within {self.read_timeout:g} s (--read-timeout)",
                    headers={"connection": "close"},  # the client is still sending, slowly
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
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


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for request headers.

    uvicorn times out an idle kept-alive connection only until its first byte arrives, and a new
    connection not at all, so a client sending one header byte every few seconds holds its
    connection forever. This closes a connection that is not being answered, yet still has not
    sent all the headers of its next request `header_timeout` seconds after it opened or after
    its previous answer (the rest of a refused body counts too: a 413 is answered before the body
    has arrived, and the client may go on sending it). While the app answers a request, its body
    read has a deadline of its own (`RequestBodyLimits`). Pass it to uvicorn as
    `http=functools.partial(HeaderTimeoutH11Protocol, header_timeout=...)`."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY):  # a request is in, being answered
            self._stop_header_deadline()

    def on_response_complete(self) -> None:
        self._start_header_deadline()  # for the next request; the base class may read it at once
        super().on_response_complete()

    def _start_header_deadline(self) -> None:
        self._stop_header_deadline()
        # closes the connection the way uvicorn closes an idle kept-alive one
        self._header_deadline = self.loop.call_later(self.header_timeout, self.timeout_keep_alive_handler)

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
