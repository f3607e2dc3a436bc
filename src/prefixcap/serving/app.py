"""The HTTP server: a FastAPI app around a Captioner, with dynamic batching, limits and metrics.

    POST /v1/caption   images in (multipart files or base64 JSON), [[{"generated_text": ...}], ...] out
    GET  /health       model, device, ready
    GET  /metrics      Prometheus text
    GET  /docs         OpenAPI page
    GET  /             the web page (static/index.html)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect
from swagger_ui_bundle import swagger_ui_path

from prefixcap import __version__
from prefixcap.captioner import Captioner
from prefixcap.errors import ImageLoadError, ImageTooLargeError
from prefixcap.serving.batching import DynamicBatcher
from prefixcap.serving.errors import APIError, ErrorBody, install_error_handlers
from prefixcap.serving.inputs import NamedImage, generation_kwargs, read_caption_request
from prefixcap.serving.limits import BodySizeLimit
from prefixcap.serving.metrics import RequestMetricsMiddleware, ServerMetrics
from prefixcap.serving.schemas import (
    GeneratedText,
    Health,
    JSONCaptionRequest,
    MultipartCaptionRequest,
)

STATIC_DIR = Path(__file__).with_name("static")
CAPTION_PATH = "/v1/caption"
T = TypeVar("T")


@dataclass
class ServerConfig:
    """Server limits. The caps on decoding options keep one request from holding the model for
    long; a request over any of them gets a 422."""

    model_name: str  # what /health and the page call the model
    max_batch_size: int = 32  # most images in one model batch
    max_wait_ms: float = 10.0  # a batch starts when full or after this long without a new image
    max_upload_mb: float = 20.0  # larger request bodies are refused with 413
    max_images: int = 64  # images per request
    max_new_tokens: int = 128  # cap on max_new_tokens (also kept within the decoder's positions)
    max_beams: int = 8  # cap on num_beams
    max_captions: int = 8  # cap on num_return_sequences


def create_app(captioner: Captioner, config: ServerConfig) -> FastAPI:
    """A ready-to-serve app; the model thread starts and stops with the app's lifespan. The pixel
    limit is the Captioner's (`Captioner(model, max_pixels=...)`)."""
    metrics = ServerMetrics(config.max_batch_size)
    batcher = DynamicBatcher(
        lambda pixels, options: _caption_batch(captioner, metrics, pixels, options),
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
    )
    limits = _option_limits(captioner, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="prefixcap",
        version=__version__,
        description="Caption images with CLIP prefixes and GPT-2. Errors are "
        '`{"error": {"kind": ..., "message": ...}}`.',
        lifespan=lifespan,
        docs_url=None,  # served below from local files: FastAPI's default page loads from a CDN
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=int(config.max_upload_mb * 2**20))
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, path=CAPTION_PATH)

    @app.post(
        CAPTION_PATH,
        summary="Caption images",
        response_model=list[list[GeneratedText]],
        responses={code: {"model": ErrorBody} for code in (400, 413, 415, 422, 500, 503)},
        openapi_extra={"requestBody": _request_body_docs()},
    )
    async def caption(request: Request) -> Any:
        """One entry per image, in order; each lists `num_return_sequences` captions. Send files in a
        repeatable multipart field `images` with options as form fields, or JSON
        `{"images": [base64, ...], "num_beams": 3, ...}`."""
        if not batcher.running:
            raise APIError(503, "not_ready", "the model is not ready yet; try again shortly")
        images, options = await read_caption_request(request, max_images=config.max_images)
        kwargs = generation_kwargs(options, captioner.model.config.generation, limits)
        captions = await _unless_disconnected(request, _caption(captioner, batcher, images, kwargs))
        metrics.images.inc(len(images))
        return [[{"generated_text": text} for text in texts] for texts in captions]

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        """Ready means the model is loaded and batching; 503 otherwise, for load balancers."""
        body = Health(
            model=config.model_name,
            device=str(captioner.model.device),
            ready=batcher.running,
            max_batch_size=config.max_batch_size,
            max_upload_mb=config.max_upload_mb,
            max_pixels=captioner.max_pixels,
        )
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="prefixcap API",
            swagger_js_url="/swagger/swagger-ui-bundle.js",
            swagger_css_url="/swagger/swagger-ui.css",
            swagger_favicon_url="data:,",
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")
    return app


def _option_limits(captioner: Captioner, config: ServerConfig) -> dict[str, int]:
    """Upper bounds on per-request options; new tokens also stop where the decoder runs out of
    positions after the prefix."""
    limit = captioner.model.max_new_tokens_limit
    max_new_tokens = config.max_new_tokens if limit is None else min(config.max_new_tokens, limit)
    return {"max_new_tokens": max_new_tokens, "num_beams": config.max_beams, "num_return_sequences": config.max_captions}


async def _caption(
    captioner: Captioner, batcher: DynamicBatcher, images: list[NamedImage], kwargs: Mapping[str, Any]
) -> list[list[str]]:
    """Decode the images in worker threads, then caption them in shared batches."""
    pixels = await asyncio.gather(*(asyncio.to_thread(_preprocess, captioner, name, data) for name, data in images))
    return await batcher.submit(pixels, kwargs)


def _preprocess(captioner: Captioner, name: str, data: bytes) -> torch.Tensor:
    try:
        return captioner.preprocess(data, name=name)
    except ImageLoadError as error:
        kind = "too_many_pixels" if isinstance(error, ImageTooLargeError) else "invalid_image"
        raise APIError(400, kind, str(error)) from None


def _caption_batch(
    captioner: Captioner, metrics: ServerMetrics, pixels: list[torch.Tensor], options: Mapping[str, Any]
) -> list[list[str]]:
    """Runs on the model thread."""
    metrics.batch_size.observe(len(pixels))
    return captioner.caption_pixels(torch.stack(pixels), **options)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, giving it up if the client disconnects first: its images then leave the batch
    queue instead of costing model time, and the other requests in its batch are unaffected."""
    task = asyncio.ensure_future(work)

    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnect() from None
        raise
    finally:
        watcher.cancel()


def _request_body_docs() -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": MultipartCaptionRequest.model_json_schema()},
            "application/json": {"schema": JSONCaptionRequest.model_json_schema()},
        },
    }
