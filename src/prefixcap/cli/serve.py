"""`prefixcap serve`: an HTTP API and a web page for a model, with dynamic batching."""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from PIL import Image

from prefixcap.cli.common import (
    add_jpeg_draft_argument,
    add_model_arguments,
    add_rerank_arguments,
    add_retrieval_arguments,
    bounded,
    load_captioner,
)
from prefixcap.errors import UserError

if TYPE_CHECKING:
    import uvicorn

# The default --max-pixels: every phone's photos at their default size, and those of 45 MP cameras;
# the model sees 224 x 224 pixels of any of them. An 8000 x 8000 image (64 MP) needs the option.
SERVER_MAX_PIXELS = 50_000_000
PIL_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None  # PIL refuses larger ones
API_KEY_VARIABLE = "PREFIXCAP_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP: JSON API, web page, metrics",
        description="Serve a model with FastAPI and uvicorn. Open http://HOST:PORT/ for a web page; "
        "POST images to /v1/caption (multipart field 'images', or JSON {\"images\": [base64, ...]}); "
        "GET /health, /metrics (Prometheus) and /docs (OpenAPI). Requests that arrive together are "
        "captioned in one model batch.",
    )
    add_model_arguments(parser, batch_size=False)
    add_jpeg_draft_argument(parser)
    parser.add_argument(
        "--max-batch-size",
        "--batch-size",
        dest="batch_size",
        metavar="N",
        type=bounded(int, 1),
        default=32,
        help="most images in one model batch; 1 turns batching off (default: 32)",
    )
    parser.add_argument(
        "--max-wait-ms",
        metavar="MS",
        type=bounded(float, 0, 10_000),
        default=10.0,
        help="once the model is free, a batch starts when full or when no image has arrived for "
        "this long (default: 10)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; beyond it, set --api-key)",
    )
    parser.add_argument(
        "--port", type=bounded(int, 0, 65535), default=8000, help="port (default: 8000; 0 picks a free one)"
    )
    access = parser.add_argument_group("access (see 'Security' in the README)")
    access.add_argument(
        "--allowed-hosts",
        metavar="HOST[:PORT],...",
        type=_comma_list,
        default=[],
        help="more Host header values to answer, such as the names clients use to reach this server; "
        "'*' answers all. Always answered: the --host address, and localhost, 127.0.0.1 and [::1] when "
        "that is loopback or 0.0.0.0, on --port. Others get 400, against DNS rebinding",
    )
    access.add_argument(
        "--cors-origins",
        metavar="ORIGIN,...",
        type=_origins,
        default=[],
        help="web pages of other origins allowed to call the API from a browser, e.g. "
        "https://app.example.com; '*' allows all (default: none: only the page this server serves)",
    )
    access.add_argument(
        "--api-key",
        metavar="KEY",
        type=_api_key,
        default=os.environ.get(API_KEY_VARIABLE) or None,
        help="require this key on /v1/ and /metrics, as 'Authorization: Bearer KEY' or 'X-API-Key: KEY' "
        f"(default: ${API_KEY_VARIABLE}, which other users cannot see in the process list; unset: no key)",
    )
    add_rerank_arguments(parser, serve=True)
    add_retrieval_arguments(parser)  # a request's show_retrieved asks for what was retrieved
    parser.add_argument(
        "--web",
        metavar="DIR",
        type=Path,
        help="also offer this `prefixcap export web` folder at /web/: a page that captions in the browser, "
        "uploading nothing (the main page links to it)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-upload-mb",
        metavar="MB",
        type=bounded(float, 0.001, 4096),
        default=20.0,
        help="largest request body in MiB; larger ones get 413 (default: 20)",
    )
    limits.add_argument(
        "--max-pixels",
        metavar="N",
        type=bounded(int, 1, PIL_MAX_PIXELS),
        default=SERVER_MAX_PIXELS,
        help=f"largest image, in pixels (width x height); larger ones get 400 (default: {SERVER_MAX_PIXELS:,})",
    )
    limits.add_argument(
        "--decode-memory-mb",
        metavar="MB",
        type=bounded(float, 16, 2**20),
        default=512.0,
        help="most memory that image decodes hold at once; more images wait their turn "
        "(default: 512; an 8000x8000 PNG takes 320)",
    )
    limits.add_argument(
        "--read-timeout",
        metavar="S",
        type=bounded(float, 0.1, 3600),
        default=60.0,
        help="seconds a client has to send a request's headers, and then again its body; slower "
        "ones are disconnected, or get 408 for the body (default: 60)",
    )
    limits.add_argument(
        "--keep-alive",
        metavar="S",
        type=bounded(float, 0.1, 3600),
        default=5.0,
        help="seconds an idle connection stays open for a next request (default: 5)",
    )
    limits.add_argument(
        "--max-connections",
        metavar="N",
        type=bounded(int, 1, 65536),
        default=100,
        help="open connections beyond which new requests get 503 (default: 100)",
    )
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="uvicorn log level (default: info)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefixcap.system.extras import require

    require("serve", feature="prefixcap serve")
    import uvicorn

    from prefixcap.serving import ServerConfig, create_app
    from prefixcap.serving.security import default_allowed_hosts, is_loopback

    if not is_loopback(args.host) and not args.api_key:
        print(
            f"warning: listening on {args.host} without --api-key: anyone who can reach it can use this server",
            file=sys.stderr,
        )
    if args.web is not None:
        from prefixcap.web.export import read_web_manifest

        read_web_manifest(args.web)  # before the slow model load, as the port
    listener = _listen(args.host, args.port)  # before the slow model load, so a busy port fails fast
    captioner = load_captioner(args, max_pixels=args.max_pixels, jpeg_draft=args.jpeg_draft)
    config = ServerConfig(
        model_name=args.model,
        max_batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
        read_timeout=args.read_timeout,
        decode_memory_mb=args.decode_memory_mb,
        allowed_hosts=[*default_allowed_hosts(args.host, listener.getsockname()[1]), *args.allowed_hosts],
        cors_origins=args.cors_origins,
        api_key=args.api_key,
        rerank_clip=args.rerank_clip,
        web_dir=args.web,
    )
    server = uvicorn.Server(uvicorn_config(create_app(captioner, config), args))  # create_app checks the model
    web = "; in-browser captioning at /web/" if args.web is not None else ""
    print(
        f"serving {args.model} on {captioner.model.device} at {_url(listener)}/ (API docs at /docs{web})",
        file=sys.stderr,
        flush=True,
    )
    server.run(sockets=[listener])
    return 0


def uvicorn_config(app: Any, args: argparse.Namespace) -> uvicorn.Config:
    """uvicorn's settings for `app`: the header deadline, keep-alive and connection cap."""
    import uvicorn

    from prefixcap.serving.limits import HeaderTimeoutH11Protocol

    return uvicorn.Config(
        app,
        log_level=args.log_level,
        http=functools.partial(HeaderTimeoutH11Protocol, header_timeout=args.read_timeout),
        timeout_keep_alive=args.keep_alive,
        limit_concurrency=args.max_connections,
    )


def _listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UserError(f"cannot listen on {host}:{port} ({reason})") from None


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one value")
    return items


def _api_key(text: str) -> str:
    if not (text.isascii() and text.isprintable()) or not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError("the key must be printable ASCII, non-empty, without spaces around it")
    return text


def _origins(text: str) -> list[str]:
    """Web origins as browsers send them: scheme://host[:port], without a path."""
    origins = _comma_list(text)
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/")):
            raise argparse.ArgumentTypeError(
                f"{origin!r} is not an origin like https://example.com or http://localhost:3000"
            )
    return origins
