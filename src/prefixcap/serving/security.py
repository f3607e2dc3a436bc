"""Who may use the server: which Host names it answers, which web pages may post to it, and an
optional API key.

A server on 127.0.0.1 is not private to this machine's user: any web page open in their browser
can send it requests. Two checks close that door:
- DNS rebinding: a page on attacker.example re-points its own name at 127.0.0.1 and then reads the
  answers as same-origin. Its requests carry `Host: attacker.example`, so only the names the
  server is reached by are answered (`allowed_hosts`, by default the bound address, plus the
  loopback names when it listens on loopback).
- Cross-site requests: a page cannot read a cross-origin answer, but a plain form or `fetch` POST
  still reaches the server and costs it model time. Browsers send `Origin` with every POST, so one
  from another origin is refused unless `cors_origins` lists it. The bundled page, and clients
  that are not browsers (they send no Origin), are unaffected.
With `api_key` set, /v1/ and /metrics also need `Authorization: Bearer KEY` or `X-API-Key: KEY`,
compared in constant time: needed once the server listens beyond loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Collection, Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from prefixcap.serving.errors import error_response

ANY = "*"  # in allowed hosts or CORS origins: every one
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # no side effects, answers unreadable cross-origin
_KEYED_PATHS = ("/v1/", "/metrics")  # the page, its files, /docs and /health stay open


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another name
        return False


def default_allowed_hosts(host: str, port: int) -> list[str]:
    """The Host values a server listening on host:port answers by default: the address it listens
    on, and the loopback names when that is loopback or every address (then also the machine's
    name; other names and addresses clients use must be added with --allowed-hosts)."""
    bound = f"[{host}]" if ":" in host else host
    names = {bound}
    if is_loopback(host) or _is_wildcard(host):
        names.update(LOOPBACK_NAMES)
    if _is_wildcard(host):
        names.add(socket.gethostname())
    return sorted(f"{name}:{port}" for name in names)


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, int | None]:
    """("name", port or None) of a Host header or an allowed-hosts entry, lower-cased; IPv6
    addresses in brackets."""
    value = value.strip().lower().rstrip(".")
    if value.count(":") > 1 and not value.startswith("["):  # a bare IPv6 address
        return f"[{value}]", None
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return name.rstrip("."), int(port)
    return value, None


class AccessGuard:
    """Refuse requests for a Host not in `allowed_hosts` (400; None answers every Host), POSTs
    from web pages of other origins than those in `cors_origins` (403), and requests to /v1/ or
    /metrics without `api_key` when one is set (401)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Iterable[str] | None,
        cors_origins: Collection[str] = (),
        api_key: str | None = None,
    ):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {_split_host(entry) for entry in allowed_hosts}
        self.cors_origins = {origin.lower().rstrip("/") for origin in cors_origins}
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope, Headers(scope=scope))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, kind, message = refusal
        response = error_response(Request(scope), status, kind, message)
        if status == 401:
            response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, str, str] | None:
        """(status, kind, message) when the request is refused, else None."""
        host = headers.get("host", "")
        if not self._host_allowed(host, default_port=443 if scope["scheme"] == "https" else 80):
            return (
                400,
                "host_not_allowed",
                (
                    f"this server does not answer to Host {host[:100]!r}; to reach it by that name, "
                    "start it with --allowed-hosts"
                ),
            )
        origin = headers.get("origin")
        if scope["method"] not in _SAFE_METHODS and origin is not None and not self._origin_allowed(origin, host):
            return (
                403,
                "cross_origin",
                (f"cross-origin request from {origin[:100]!r} refused; allow that web page with --cors-origins"),
            )
        if self.api_key is not None and scope["method"] != "OPTIONS" and scope["path"].startswith(_KEYED_PATHS):
            if not hmac.compare_digest(_presented_key(headers), self.api_key):
                return 401, "unauthorized", "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY"
        return None

    def _host_allowed(self, host: str, default_port: int) -> bool:
        if self.allowed_hosts is None:
            return True
        name, port = _split_host(host)
        port = default_port if port is None else port
        return any(
            allowed in (ANY, name) and allowed_port in (None, port) for allowed, allowed_port in self.allowed_hosts
        )

    def _origin_allowed(self, origin: str, host: str) -> bool:
        """Same origin as the page the server itself serves, or listed in cors_origins."""
        origin = origin.lower().rstrip("/")
        netloc = urlsplit(origin).netloc  # empty for "null": sandboxed frames, files, data: URLs
        return (netloc and netloc == host.lower()) or ANY in self.cors_origins or origin in self.cors_origins


def _presented_key(headers: Headers) -> bytes:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else headers.get("x-api-key", "")
    return key.encode("utf-8", "surrogateescape")
