"""Helpers shared by the in-process server tests: request bodies, ASGI drivers and /metrics parsing."""

from __future__ import annotations

import io

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def png(width: int, height: int) -> bytes:
    """A one-colour PNG of the given size."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def multipart(*images: bytes, names=None):
    """`files=` for a multipart caption request with one `images` part per image."""
    names = names or [f"photo{i}.jpg" for i in range(len(images))]
    return [("images", (name, data, "image/jpeg")) for name, data in zip(names, images)]


def metric_samples(client_or_text) -> dict[tuple[str, tuple], float]:
    """/metrics (of a client, or already fetched text) as {(sample name, sorted labels): value}."""
    text = client_or_text if isinstance(client_or_text, str) else client_or_text.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def with_app(app, scenario):
    """Run `scenario(client)` against `app` in this event loop, lifespan included."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await scenario(client)


async def call_asgi(app, request: httpx.Request, receive) -> list[dict]:
    """Send `request` to `app` with a hand-made `receive`, to play clients httpx cannot."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "http", "path": request.url.path, "raw_path": request.url.raw_path, "query_string": b"",
        "root_path": "", "headers": [(k.lower(), v) for k, v in request.headers.raw], "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    return sent
