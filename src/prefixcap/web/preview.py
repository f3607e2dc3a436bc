"""A web export served on a loopback port, as a static host serves it: for tests and benchmarks
that drive the page in a browser."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefixcap.web.export import ISOLATION_HEADERS


@contextmanager
def serve_folder(directory: str | Path, *, isolated: bool = False) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 (a free port) until the block ends; yields its URL. With
    `isolated`, responses carry the COOP/COEP headers that let the page run WASM on threads."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def end_headers(self) -> None:
            for name, value in ISOLATION_HEADERS.items() if isolated else ():
                self.send_header(name, value)
            super().end_headers()

        def log_message(self, *args: object) -> None:
            pass  # no line per request

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
