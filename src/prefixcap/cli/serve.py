"""`prefixcap serve`: an HTTP API and a web page for a model, with dynamic batching."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from prefixcap.cli.common import add_jpeg_draft_argument, add_model_arguments, at_least, load_captioner
from prefixcap.errors import UserError
from prefixcap.images import DEFAULT_MAX_PIXELS


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
        type=at_least(int, 1),
        default=32,
        help="most images in one model batch; 1 turns batching off (default: 32)",
    )
    parser.add_argument(
        "--max-wait-ms",
        metavar="MS",
        type=at_least(float, 0),
        default=10.0,
        help="once the model is free, a batch starts when full or when no image has arrived for "
        "this long (default: 10)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; the server has no "
        "authentication, so think twice before 0.0.0.0)",
    )
    parser.add_argument("--port", type=at_least(int, 0), default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument(
        "--max-upload-mb",
        metavar="MB",
        type=at_least(float, 0.001),
        default=20.0,
        help="largest request body in MiB; larger ones get 413 (default: 20)",
    )
    parser.add_argument(
        "--max-pixels",
        metavar="N",
        type=at_least(int, 1),
        default=DEFAULT_MAX_PIXELS,
        help=f"largest image, in pixels (width x height); larger ones get 400 (default: {DEFAULT_MAX_PIXELS:,})",
    )
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="uvicorn log level (default: info)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from prefixcap.serving import ServerConfig, create_app

    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach it can use this server", file=sys.stderr)
    listener = _listen(args.host, args.port)  # before the slow model load, so a busy port fails fast
    captioner = load_captioner(args, max_pixels=args.max_pixels, jpeg_draft=args.jpeg_draft)
    config = ServerConfig(
        model_name=args.model,
        max_batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(captioner, config), log_level=args.log_level))
    print(
        f"serving {args.model} on {captioner.model.device} at {_url(listener)}/ (API docs at /docs)",
        file=sys.stderr,
        flush=True,
    )
    server.run(sockets=[listener])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UserError(f"cannot listen on {host}:{port} ({reason})") from None


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False

