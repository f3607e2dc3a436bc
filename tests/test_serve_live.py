"""`prefixcap serve` as users run it: a child process on a loopback port, driven by a real
browser (Playwright + Debian's Chromium) and by a bounded load test."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from prefixcap import Captioner
from prefixcap.cli import build_parser
from tests.helpers_serve_process import serve_in_subprocess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
MAX_PIXELS = 1_000_000
CLIENTS, REQUESTS_PER_CLIENT = 32, 50
RSS_GROWTH_LIMIT_MB = 200


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, tmp_path_factory):
    # A long keep-alive: a client starved of CPU for over the default 5 s would otherwise send its next
    # request on a connection the server is closing, and read an error no server fault caused.
    args = ["--max-upload-mb", "1", "--max-pixels", str(MAX_PIXELS), "--max-batch-size", "16", "--max-wait-ms", "10",
            "--keep-alive", "60"]  # fmt: skip
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # One intra-op thread: a tiny model gains nothing from more, and on a shared 2-core machine
    # torch's spinning worker threads made each batch ~50x slower.
    with serve_in_subprocess(tiny_model_dir, *args, log_path=log, env={"OMP_NUM_THREADS": "1"}, timeout=120) as (
        process,
        url,
    ):
        yield process, url


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner.from_pretrained(tiny_model_dir, max_pixels=MAX_PIXELS)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert "--max-batch-size" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-batch-size", "0"])
    assert "--max-batch-size/--batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_a_busy_port_is_one_clear_error(tiny_model_dir):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        command = [sys.executable, "-m", "prefixcap", "serve", "--model", str(tiny_model_dir), "--port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port} (Address already in use)"


def test_serves_page_health_and_captions(live_server, captioner, example_images):
    _, url = live_server
    assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
    health = httpx.get(f"{url}/health").json()
    assert health["ready"] and health["device"] == "cpu" and health["max_pixels"] == MAX_PIXELS
    assert 'id="file-input"' in httpx.get(url).text
    photo = example_images[0].read_bytes()
    answer = httpx.post(f"{url}/v1/caption", files={"images": (example_images[0].name, photo)}, timeout=60)
    assert [[c["generated_text"] for c in entry] for entry in answer.json()] == captioner([photo])


# ---------------------------------------------------------------------------- the browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_the_page_captions_uploaded_images(live_server, captioner, example_images, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _, url = live_server
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("these are notes, not a photo")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#model-status")).to_contain_text("on cpu")

            # greedy: one caption, the same the Python API gives
            page.set_input_files("#file-input", example_images[0])
            first = page.locator(".card.done .caption")
            expect(first).to_have_text(captioner([example_images[0].read_bytes()])[0], timeout=60_000)

            # beam search with two captions per image
            page.check("input[name=mode][value=beam]")
            page.fill("input[name=num_return_sequences]", "2")
            page.set_input_files("#file-input", example_images[1])
            expect(page.locator(".card").last.locator(".caption")).to_have_count(2, timeout=60_000)

            # a file that is not an image: its card says why
            page.set_input_files("#file-input", not_an_image)
            expect(page.locator(".card.failed .message")).to_contain_text("(notes.jpg): not an image", timeout=60_000)
        finally:
            browser.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_the_docs_page_renders_the_api(live_server):
    """/docs said "Unable to render this definition": FastAPI's schema is OpenAPI 3.1,
    which the bundled Swagger UI predated. The page must list the caption operation, from local
    files only (the browser may not reach any other host)."""
    from playwright.sync_api import expect, sync_playwright

    _, url = live_server
    origin = url.rstrip("/")
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{url}/docs")
            operation = page.locator(".opblock-post").filter(has_text="/v1/caption")
            expect(operation).to_contain_text("Caption images", timeout=30_000)
            expect(page.locator(".opblock-get").filter(has_text="/health")).to_be_visible()
            assert "Unable to render" not in page.content()
        finally:
            browser.close()
    assert requested and all(address.startswith(origin) or address.startswith("data:") for address in requested)


# ---------------------------------------------------------------------------- load
def load_cases(example_images) -> list[tuple[str, dict, int]]:
    """(name, httpx request kwargs, expected status): half good images, half bad requests."""
    photos = [path.read_bytes() for path in example_images[:3]]
    drawn = encode(Image.new("RGB", (96, 64), (250, 200, 0)), "PNG")
    options = {"max_new_tokens": "8"}
    files = lambda name, data: {"files": {"images": (name, data)}, "data": options}
    return [
        ("photo 0", files("a.jpg", photos[0]), 200),
        ("photo 1", files("b.jpg", photos[1]), 200),
        ("photo 2 as json", {"json": {"images": [base64.b64encode(photos[2]).decode()], "max_new_tokens": 8}}, 200),
        ("drawn png", files("c.png", drawn), 200),
        ("photo 0 again", files("d.jpg", photos[0]), 200),
        ("not an image", files("e.jpg", b"plain text"), 400),
        ("truncated jpeg", files("f.jpg", photos[0][:300]), 400),
        ("too many pixels", files("g.png", encode(Image.new("L", (1100, 1000)), "PNG")), 400),
        ("body over the limit", files("h.jpg", bytes(1_200_000)), 413),
        ("bad options", {"files": {"images": ("i.jpg", photos[1])}, "data": {"num_beams": "0"}}, 422),
    ]


def expected_captions(captioner, request: dict) -> list[list[str]] | None:
    if "json" in request:
        return captioner([base64.b64decode(request["json"]["images"][0])], max_new_tokens=8)
    return captioner([request["files"]["images"][1]], max_new_tokens=8)


def batch_sizes(metrics_text: str) -> tuple[float, float, float]:
    """(batches, images, largest bucket bound with a batch in it) from the batch-size histogram."""
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
        if s.name.startswith("prefixcap_batch_size")
    }
    buckets = sorted((float(le), count) for (name, le), count in samples.items() if name.endswith("_bucket"))
    largest = next(bound for bound, count in buckets if count == buckets[-1][1])
    return samples[("prefixcap_batch_size_count", None)], samples[("prefixcap_batch_size_sum", None)], largest


@pytest.mark.slow
def test_load_good_and_bad_requests(live_server, captioner, example_images):
    process, url = live_server
    cases = load_cases(example_images)
    expected = {name: expected_captions(captioner, request) for name, request, status in cases if status == 200}

    async def client(http: httpx.AsyncClient, index: int, requests: int) -> list[tuple[str, int, object]]:
        outcomes = []
        for i in range(requests):
            name, request, _ = cases[(index + i) % len(cases)]
            answer = await http.post("/v1/caption", **request)
            outcomes.append((name, answer.status_code, answer.json()))
        return outcomes

    async def run_clients(count: int, requests: int) -> list[tuple[str, int, object]]:
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=count)) as http:
            per_client = await asyncio.gather(*(client(http, index, requests) for index in range(count)))
        return [outcome for outcomes in per_client for outcome in outcomes]

    server = psutil.Process(process.pid)
    asyncio.run(run_clients(4, requests=len(cases)))  # warm-up: allocator pools, thread pools, model caches
    rss_before = server.memory_info().rss
    outcomes = asyncio.run(run_clients(CLIENTS, REQUESTS_PER_CLIENT))
    rss_growth_mb = (server.memory_info().rss - rss_before) / 2**20
    batches, images, largest = batch_sizes(httpx.get(f"{url}/metrics").text)

    statuses = {name: status for name, _, status in cases}
    assert len(outcomes) == CLIENTS * REQUESTS_PER_CLIENT
    wrong = Counter(name for name, status, _ in outcomes if status != statuses[name])
    assert not wrong, f"unexpected statuses: {wrong}"
    for name, status, body in outcomes:
        if status == 200:
            assert [[c["generated_text"] for c in entry] for entry in body] == expected[name], name
        else:
            assert set(body) == {"error"} and body["error"]["message"]
    assert all(status < 500 for _, status, _ in outcomes)
    assert rss_growth_mb < RSS_GROWTH_LIMIT_MB
    assert images / batches > 1 and largest > 1  # concurrent requests really shared batches
    good = sum(status == 200 for _, status, _ in outcomes)
    print(
        f"\nload: {len(outcomes)} requests ({good} good, {len(outcomes) - good} bad, 0 unexpected), "
        f"RSS growth {rss_growth_mb:+.1f} MB, {batches:.0f} batches, {images / batches:.1f} images/batch, "
        f"largest batch in bucket <= {largest:.0f}"
    )
    assert httpx.get(f"{url}/health").json()["ready"]
