"""`prefixcap serve --web DIR`: the server offers a web export's page, which captions in the
browser without sending the images to the server."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from prefixcap import Captioner
from prefixcap.web.export import ISOLATION_HEADERS
from tests.helpers_serve_process import serve_in_subprocess
from tests.test_web_browser import CHROMIUM, CHROMIUM_ARGS, NO_GPU
from tests.test_web_export import onnx_exports, ort_web_tarball, web_exports  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def server_with_web(onnx_exports, web_exports, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ("--web", str(web_exports["float32"]))
    with serve_in_subprocess(onnx_exports["float32"], *args, log_path=log, env={"OMP_NUM_THREADS": "1"}) as (_, url):
        yield url


def test_the_export_is_served_cross_origin_isolated(server_with_web):
    page = httpx.get(f"{server_with_web}/web/")
    assert page.status_code == 200 and "caption in this browser" in page.text
    for name, value in ISOLATION_HEADERS.items():  # WASM threads need them
        assert page.headers[name] == value
    assert httpx.get(f"{server_with_web}/web/prefixcap_web.json").json()["format"] == "prefixcap-web"


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_the_page_offers_captioning_in_the_browser_and_uploads_nothing(
    server_with_web,
    onnx_exports,  # noqa: F811
    example_images,
):
    from playwright.sync_api import expect, sync_playwright

    expected = Captioner.from_pretrained(onnx_exports["float32"])([example_images[0]])[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + NO_GPU)
        try:
            page = browser.new_page()
            page.goto(server_with_web)
            page.click("#web-link a")
            page.wait_for_selector("body[data-ready]", timeout=120_000)
            assert page.evaluate("crossOriginIsolated")  # so WASM runs on every core
            sent = []
            page.on("request", lambda request: sent.append(request.url))
            page.set_input_files("#file-input", example_images[0])
            expect(page.locator(".card.done .caption")).to_have_text(expected, timeout=60_000)
        finally:
            browser.close()
    assert sent == []  # the image never left the browser


def test_a_folder_that_is_not_a_web_export_is_one_clear_error(onnx_exports):  # noqa: F811
    command = [sys.executable, "-m", "prefixcap", "serve", "--model", str(onnx_exports["float32"])]
    result = subprocess.run(
        [*command, "--web", str(onnx_exports["float32"])], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {onnx_exports['float32']}: not a prefixcap web export (no prefixcap_web.json; "
        "`prefixcap export web` writes one)"
    )
