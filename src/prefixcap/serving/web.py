"""`prefixcap serve --web DIR`: the server also offers a web export (`prefixcap export web`) at /web/,
whose page captions in the browser: images captioned there are never sent to the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from prefixcap.web.export import ISOLATION_HEADERS, read_web_manifest

WEB_PATH = "/web"


class IsolatedStaticFiles(StaticFiles):
    """Static files sent with COOP/COEP headers: the page is then cross-origin isolated, which
    onnxruntime-web needs to run WASM on several threads."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(ISOLATION_HEADERS)
        return response


def mount_web_export(app: FastAPI, directory: Path) -> None:
    """Serve the web export in `directory` at /web/ (UserError if it is not one). Links out of the
    folder are not followed."""
    read_web_manifest(directory)
    app.mount(WEB_PATH, IsolatedStaticFiles(directory=directory, html=True), name="web")
