"""The HTTP server: a FastAPI app around a Captioner, with dynamic batching, limits and metrics.

POST /v1/caption   images in (multipart files or base64 JSON), [[{"generated_text": ...}], ...] out
GET  /health       model, device, ready
GET  /metrics      Prometheus text
POST /v1/chat/completions, GET /v1/models   the OpenAI API (serving/openai.py)
GET  /docs         OpenAPI page
GET  /             the web page (static/index.html)
GET  /web/         a web export's page, which captions in the browser (with --web)
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect
from swagger_ui_bundle import swagger_ui_path

from prefixcap import __version__
from prefixcap.captioner import Captioner
from prefixcap.errors import UserError
from prefixcap.options import CaptionRequest
from prefixcap.options.request import Reranker
from prefixcap.pipeline import loop as caption_loop
from prefixcap.retrieval.inference import Retrieval, retrieved_json
from prefixcap.serving.batching import DynamicBatcher
from prefixcap.serving.errors import APIError, ErrorBody, install_error_handlers
from prefixcap.serving.image_decoding import ImageDecoder, default_workers
from prefixcap.serving.inputs import NamedImage, caption_request, check_limits, read_caption_request
from prefixcap.serving.limits import RequestBodyLimits
from prefixcap.serving.metrics import RequestMetricsMiddleware, ServerMetrics
from prefixcap.serving.openai import openai_router
from prefixcap.serving.schemas import (
    GeneratedText,
    Health,
    JSONCaptionRequest,
    MultipartCaptionRequest,
)
from prefixcap.serving.security import AccessGuard, is_loopback
from prefixcap.serving.web import mount_web_export

STATIC_DIR = Path(__file__).with_name("static")
CAPTION_PATH = "/v1/caption"
T = TypeVar("T")


@dataclass
class ServerConfig:
    """Server limits and access rules. The caps on decoding options keep one request from holding
    the model for long; a request over any of them gets a 422. Access rules: see `security`."""

    model_name: str  # what /health and the page call the model (a folder: its name, but to loopback)
    max_batch_size: int = 32  # most images in one model batch
    max_wait_ms: float = 10.0  # a batch starts when full or after this long without a new image
    max_upload_mb: float = 20.0  # larger request bodies are refused with 413
    max_images: int = 64  # images per request
    max_new_tokens: int = 128  # cap on max_new_tokens (also kept within the decoder's positions)
    max_beams: int = 8  # cap on num_beams
    max_captions: int = 8  # cap on num_return_sequences
    read_timeout: float = 60.0  # seconds for a request body to arrive once its headers have (408)
    decode_memory_mb: float = 512.0  # most memory that image decodes hold at once
    decode_workers: int | None = None  # threads decoding images (None: one per CPU)
    allowed_hosts: list[str] | None = None  # Host values answered (None: all, e.g. behind a proxy)
    cors_origins: list[str] = field(default_factory=list)  # other web origins that may POST ("*": all)
    api_key: str | None = None  # required by /v1/ and /metrics when set
    rerank_clip: str | None = None  # CLIP for requests' rerank="clipscore" (None: the model's own)
    web_dir: Path | None = None  # a `prefixcap export web` folder to offer at /web/


def create_app(captioner: Captioner, config: ServerConfig) -> FastAPI:
    """A ready-to-serve app; the model and decoding threads start and stop with the app's
    lifespan. The pixel limit is the Captioner's (`Captioner(model, max_pixels=...)`). Raises
    UserError for a model whose own decoding defaults would fail every request."""
    limits = _option_limits(captioner, config)
    _check_model(captioner, config, limits)
    metrics = ServerMetrics(config.max_batch_size)
    reranker = functools.cache(lambda: _load_reranker(captioner, config))  # on the first request asking
    batcher = DynamicBatcher(
        lambda pixels, options: _caption_batch(captioner, metrics, pixels, options, reranker),
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
    )
    decoder = ImageDecoder(
        captioner,
        memory_bytes=int(config.decode_memory_mb * 2**20),
        workers=config.decode_workers or default_workers(),
    )
    public_model_name = _public_name(config.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        decoder.start()
        await batcher.start()
        yield
        await batcher.stop()
        await decoder.stop()

    app = FastAPI(
        title="prefixcap",
        version=__version__,
        description="Caption images with CLIP prefixes and GPT-2. Errors are "
        '`{"error": {"kind": ..., "message": ...}}`.',
        lifespan=lifespan,
        docs_url=None,  # served below from local files (Swagger UI 5, for OpenAPI 3.1): FastAPI's default uses a CDN
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    if config.web_dir is not None:
        mount_web_export(app, config.web_dir)
    # the first added runs last, next to the endpoints
    app.add_middleware(RequestBodyLimits, max_bytes=int(config.max_upload_mb * 2**20), read_timeout=config.read_timeout)
    app.add_middleware(
        AccessGuard, allowed_hosts=config.allowed_hosts, cors_origins=config.cors_origins, api_key=config.api_key
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, path=CAPTION_PATH)
    if config.cors_origins:  # outermost: answers preflights, and lets allowed pages read errors too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "x-api-key", "content-type"],
        )

    @app.post(
        CAPTION_PATH,
        summary="Caption images",
        response_model=list[list[GeneratedText]],
        response_model_exclude_none=True,  # `score` only when reranked, `retrieved` only when asked for
        responses={code: {"model": ErrorBody} for code in (400, 413, 415, 422, 500, 503)},
        openapi_extra={"requestBody": _request_body_docs()},
    )
    async def caption(request: Request) -> Any:
        """One entry per image, in order; each lists `num_return_sequences` captions. Send files in a
        repeatable multipart field `images` with options as form fields, or JSON
        `{"images": [base64, ...], "num_beams": 3, ...}`. With `"rerank": "clipscore"`, each image's
        captions come best first by CLIPScore, each with its `score`. A server started with --datastore
        retrieves each image's prompt; `"show_retrieved": true` lists what it retrieved with each caption."""
        if not batcher.running:
            raise APIError(503, "not_ready", "the model is not ready yet; try again shortly")
        images, options = await read_caption_request(request, max_images=config.max_images)
        retrieval = _retrieval(captioner, options.show_retrieved)
        checked = caption_request(options, captioner.model, limits, rerank=options.rerank, retrieval=retrieval)
        captions = await _unless_disconnected(request, _caption(decoder, batcher, images, checked))  # grouped by it
        metrics.images.inc(len(images))
        return [
            [
                {"generated_text": text, "score": score, "retrieved": _retrieved(texts)}
                for text, score in zip(texts, _scores(texts), strict=True)
            ]
            for texts in captions
        ]

    app.include_router(  # the OpenAI API: captions through the same decoder, batcher and limits
        openai_router(
            captioner,
            limits,
            model_name=public_model_name,
            metrics=metrics,
            ready=lambda: batcher.running,
            caption=lambda request, images, checked: _unless_disconnected(
                request, _caption(decoder, batcher, images, checked)
            ),
        )  # fmt: skip
    )

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health(request: Request) -> JSONResponse:
        """Ready means the model is loaded and batching; 503 otherwise, for load balancers."""
        local = request.client is not None and is_loopback(request.client.host)
        body = Health(
            model=config.model_name if local else public_model_name,
            device=str(captioner.model.device),
            ready=batcher.running,
            max_batch_size=config.max_batch_size,
            max_upload_mb=config.max_upload_mb,
            max_pixels=captioner.loader.max_pixels,
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
            swagger_ui_parameters={"validatorUrl": None},  # no badge from validator.swagger.io: no other host
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")
    return app


def _option_limits(captioner: Captioner, config: ServerConfig) -> dict[str, int]:
    """Upper bounds on per-request options; new tokens also stop where the decoder runs out of
    positions after the prefix."""
    limit = captioner.model.max_new_tokens_limit
    max_new_tokens = config.max_new_tokens if limit is None else min(config.max_new_tokens, limit)
    # num_return_sequences first: without sampling it also sets num_beams, and the error should
    # name what the client asked for
    return {
        "max_new_tokens": max_new_tokens,
        "num_return_sequences": config.max_captions,
        "num_beams": config.max_beams,
    }


def _check_model(captioner: Captioner, config: ServerConfig, limits: Mapping[str, int]) -> None:
    """Refuse to serve a model whose saved stop token or decoding defaults are invalid, or over
    this server's limits: it would report ready, then fail every request that relies on them."""
    try:
        captioner.model.stop_token_ids()
        defaults = captioner.model.generation_options()
        check_limits(defaults, limits, requested={})
    except (UserError, ValueError) as error:
        raise UserError(f"cannot serve {config.model_name}: {error}") from None
    except APIError as error:
        raise UserError(f"cannot serve {config.model_name}: {error.message}") from None


def _public_name(model_name: str) -> str:
    """What /health tells clients beyond this machine: a model folder's name, not its path."""
    return Path(model_name).name if Path(model_name).exists() else model_name


async def _caption(
    decoder: ImageDecoder, batcher: DynamicBatcher, images: list[NamedImage], request: CaptionRequest
) -> list[list[str]]:
    """Decode the images in worker threads, then caption them in shared batches. The first image
    that fails fails the request, and the others are not decoded."""
    decodes = [asyncio.ensure_future(decoder.pixels(name, data)) for name, data in images]
    try:
        pixels = await asyncio.gather(*decodes)
    except BaseException:
        for decode in decodes:
            decode.cancel()
        raise
    return await batcher.submit(pixels, request)


def _caption_batch(
    captioner: Captioner,
    metrics: ServerMetrics,
    pixels: list[torch.Tensor],
    request: CaptionRequest,
    reranker: Callable[[], Reranker],
) -> list[list[str]]:
    """Runs on the model thread, which also loads the reranker when a batch first needs it: one
    step of the caption loop."""
    metrics.batch_size.observe(len(pixels))
    if request.rerank is not None:
        request = dataclasses.replace(request, rerank=reranker())
    return caption_loop.caption_batch(captioner.model, request, pixels=torch.stack(pixels))


def _load_reranker(captioner: Captioner, config: ServerConfig) -> Reranker:
    """The CLIPScore reranker, or a 422 saying why this server has none (e.g. a vision-only CLIP)."""
    from prefixcap.evaluation.clipscore import load_reranker

    try:
        return load_reranker(captioner, config.rerank_clip, flag="prefixcap serve --rerank-clip")
    except UserError as error:
        raise APIError(422, "invalid_options", f"rerank: {error}") from None


def _retrieval(captioner: Captioner, show: bool | None) -> Retrieval | None:
    """The server's retrieval (--datastore), showing what was retrieved if the request asks."""
    if captioner.retrieval is None:
        if show:
            raise APIError(
                422, "invalid_options", "show_retrieved: this server has no datastore (serve --datastore DS)"
            )
        return None
    return captioner.retrieval.with_options(show=bool(show))


def _retrieved(captions: list[str]) -> list[dict[str, Any]] | None:
    """What the image of these captions retrieved (`RetrievedCaptions`), or None when not asked for."""
    found = getattr(captions, "retrieved", None)
    return None if found is None else retrieved_json(found)


def _scores(captions: list[str]) -> list[float | None]:
    """The reranker's score of each caption (`RankedCaptions`), or None each when not reranked."""
    return getattr(captions, "scores", None) or [None] * len(captions)


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
