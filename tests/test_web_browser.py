"""Web exports in a real browser (Playwright + Debian's Chromium, headless), against Python ONNX
Runtime on the same ONNX graphs: the same tokens, the same pixels, and no request after load."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prefixcap import Captioner
from prefixcap.inputs.images import load_image
from prefixcap.onnx.export import export_onnx
from prefixcap.onnx.runtime import OnnxCaptionModel
from prefixcap.testing import COLOURS, build_decoder, build_image_dependent_model, colour_image
from prefixcap.web.export import export_web
from prefixcap.web.preview import serve_folder
from tests.test_web_export import onnx_exports, ort_web_tarball, web_exports  # noqa: F401 (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
NO_GPU, WEBGPU = (
    ["--disable-gpu"],
    ["--enable-unsafe-webgpu"],
)  # headless Chromium's WebGPU is SwiftShader's, on the CPU
MIN_DISTINCT_CAPTIONS = 8
INT8_AGREEMENT = 0.95
# int4 (4-bit blocks of 32, a tiny model whose rows are one block each) changes some captions of the tiny
# image-dependent model: 71-79% of greedy and beam-3 captions on these images stay the float32 export's
INT4_AGREEMENT = 0.6
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


# ---------------------------------------------------------------------------- images
def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(example_images) -> list[tuple[str, bytes]]:
    """24 images: the plain colours at several sizes, two-colour and noisy mixtures in several
    shapes (so that the resize and crop matter), and the example photos (JPEG)."""
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    out = [(f"{name}.png", encode(colour_image(name, 24 + 11 * i), "PNG")) for i, name in enumerate(names)]
    for i in range(12):
        first, second = COLOURS[names[i % 8]], COLOURS[names[(i + 3) % 8]]
        array = np.empty((40 + 9 * i, 100 - 5 * i, 3), np.uint8)
        array[:] = first
        array[:, : array.shape[1] * (i % 3 + 1) // 5] = second
        array = np.clip(array + rng.integers(-40, 40, array.shape), 0, 255).astype(np.uint8)
        out.append((f"mix{i}.png", encode(array, "PNG")))
    out += [(path.name, path.read_bytes()) for path in example_images]
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------- serving and the browser
@contextmanager
def loaded_page(url: str, *, flags: list[str] = NO_GPU) -> Iterator[tuple[object, list[str]]]:
    """The export's page at `url`, once its model has loaded, and the log of every request the
    page makes from then on."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + flags)
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url)
            page.wait_for_selector("body[data-ready]", timeout=120_000)
            requests.clear()
            yield page, requests
        finally:
            browser.close()


GENERATE = """async ([images, options]) => {
  const rows = [];
  for (const [name, data] of images) {
    const file = new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name);
    const [captions] = await captioner.generate([file], options);
    rows.push(captions);
  }
  return rows;
}"""


def browser_tokens(page, images, **options) -> list[list[int]]:
    """Each image's captions' token ids, best first, made in the page from the image file."""
    return page.evaluate(GENERATE, [[(name, b64(data)) for name, data in images], options])


def python_tokens(model: OnnxCaptionModel, images, **options) -> list[list[int]]:
    """The same from Python ONNX Runtime on the same graphs, one image at a time like the page."""
    rows = []
    for _, data in images:
        pixels = model.preprocessor.load_pixels(data).unsqueeze(0)
        rows.append(model.generate(pixels=pixels, **options).tolist())
    return rows


@pytest.fixture(scope="module")
def python_models(onnx_exports):  # noqa: F811 (the fixture imported above)
    return {precision: OnnxCaptionModel.from_pretrained(path, threads=1) for precision, path in onnx_exports.items()}


# ---------------------------------------------------------------------------- tests
def test_float32_tokens_equal_python_onnx_runtime(web_exports, python_models, images):  # noqa: F811
    model = python_models["float32"]
    greedy = python_tokens(model, images)
    beam = python_tokens(model, images, num_beams=3, num_return_sequences=3)  # all three hypotheses
    assert len({str(rows) for rows in greedy}) >= MIN_DISTINCT_CAPTIONS  # the captions depend on the image
    with serve_folder(web_exports["float32"]) as url, loaded_page(url) as (page, _):
        assert page.evaluate("captioner.info.backend") == "wasm"
        assert browser_tokens(page, images, numBeams=1) == greedy
        assert browser_tokens(page, images, numBeams=3, numReturnSequences=3) == beam


def test_the_page_captions_many_files_without_a_request(web_exports, onnx_exports, images, tmp_path):  # noqa: F811
    files = []
    for name, data in images:
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    captioner = Captioner.from_pretrained(onnx_exports["float32"])
    expected = captioner([data for _, data in images])
    with serve_folder(web_exports["float32"]) as url, loaded_page(url) as (page, requests):
        status = page.inner_text("#model-status")
        assert "ready" in status and "float32" in status and "WASM, 1 thread" in status
        page.set_input_files("#file-input", files)
        page.wait_for_function(f"document.querySelectorAll('.card.done').length === {len(files)}", timeout=300_000)
        captions = page.eval_on_selector_all(".card", "cards => cards.map(c => [...c.querySelectorAll('.caption')].map(e => e.textContent))")  # fmt: skip
        assert captions == expected
        assert page.inner_text("#queue-status") == f"{len(files)} of {len(files)} images captioned"

        # beam search with two captions each, for images dropped on the page
        page.check("input[name=mode][value=beam]")
        page.fill("input[name=numReturnSequences]", "2")
        drop = page.evaluate_handle(
            """([name, data]) => { const transfer = new DataTransfer();
               transfer.items.add(new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name)); return transfer; }""",
            [images[0][0], b64(images[0][1])],
        )
        page.dispatch_event("#drop-zone", "drop", {"dataTransfer": drop})
        page.wait_for_function(f"document.querySelectorAll('.card.done').length === {len(files) + 1}", timeout=60_000)
        dropped = page.locator(".card").last.locator(".caption").all_text_contents()
        assert dropped == captioner([images[0][1]], num_beams=3, num_return_sequences=2)[0]
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert requests == []  # nothing uploaded, nothing fetched: everything after load ran in the page


def quantized_tokens(precision: str, web_dir: Path, model: OnnxCaptionModel, images) -> tuple[list, list]:
    """(Python ONNX Runtime's tokens, the browser's) for a quantized export, greedy then beam 3;
    the export runs on WASM, and the images give distinct captions."""
    expected = python_tokens(model, images) + python_tokens(model, images, num_beams=3)
    assert len({str(rows) for rows in expected}) >= MIN_DISTINCT_CAPTIONS
    with serve_folder(web_dir) as url, loaded_page(url) as (page, _):
        assert page.evaluate("[captioner.info.backend, captioner.info.precision]") == ["wasm", precision]
        got = browser_tokens(page, images, numBeams=1) + browser_tokens(page, images, numBeams=3)
    return expected, got


def test_int8_tokens_agree_with_python(web_exports, python_models, images):  # noqa: F811
    expected, got = quantized_tokens("int8", web_exports["int8"], python_models["int8"], images)
    agreement = sum(a == b for a, b in zip(got, expected, strict=True)) / len(expected)
    assert agreement >= INT8_AGREEMENT, f"{agreement:.0%} of int8 captions agree"


def test_threads_when_cross_origin_isolated_and_webgpu_where_available(web_exports, python_models, images):  # noqa: F811
    greedy = python_tokens(python_models["float32"], images)
    with serve_folder(web_exports["float32"], isolated=True) as url, loaded_page(url) as (page, _):
        assert page.evaluate("crossOriginIsolated")
        assert page.evaluate("captioner.info.threads") == page.evaluate("navigator.hardwareConcurrency")
        assert browser_tokens(page, images) == greedy
    with serve_folder(web_exports["float32"]) as url, loaded_page(url, flags=WEBGPU) as (page, _):
        if page.evaluate("captioner.info.backend") != "webgpu":
            pytest.skip("this Chromium offers no WebGPU adapter")
        assert browser_tokens(page, images) == greedy


def exif_rotated_jpeg(photo: bytes) -> bytes:
    image = Image.open(io.BytesIO(photo))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=90)
    return buffer.getvalue()


def test_the_browser_sees_the_pixels_python_sees(web_exports, python_models, example_images):  # noqa: F811
    photo = np.asarray(load_image(example_images[0]))
    rgba = np.dstack([photo, np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None, :].repeat(photo.shape[0], 0)])
    files = {
        "baseline 4:2:0.jpg": encode(photo, "JPEG", quality=90),
        "4:4:4.jpg": encode(photo, "JPEG", quality=95, subsampling=0),
        "progressive.jpg": encode(photo, "JPEG", quality=80, progressive=True),
        "grey.jpg": encode(photo[..., 0], "JPEG"),
        "exif-rotated.jpg": exif_rotated_jpeg(example_images[1].read_bytes()),
        "alpha.png": encode(rgba, "PNG"),
        "palette.png": encode(np.asarray(Image.fromarray(photo).convert("P")), "PNG"),
        "grey 16-bit.png": encode(photo[..., 1].astype(np.uint16) * 257, "PNG"),
        "lossy.webp": encode(photo, "WEBP", quality=80),
    }
    decode = """async ([name, data]) => {
      const file = new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name);
      const { decodeImage } = await import("./captioner.js");  // cached: loaded with the page
      const [decoded, pixels] = [await decodeImage(file), await captioner.pixels(file)];
      const base64 = (bytes) => {
        let text = "";
        for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
        return btoa(text);
      };
      return [[decoded.height, decoded.width], base64(decoded.data), base64(pixels.data)];
    }"""
    preprocessor = python_models["float32"].preprocessor
    with serve_folder(web_exports["float32"]) as url, loaded_page(url) as (page, requests):
        for name, data in files.items():
            shape, decoded, pixels = page.evaluate(decode, [name, b64(data)])
            expected = np.asarray(load_image(data))
            assert tuple(shape) == expected.shape[:2], name  # upright: EXIF orientation applied
            assert base64.b64decode(decoded) == expected.tobytes(), f"{name}: the browser decodes other RGB values"
            assert base64.b64decode(pixels) == preprocessor.load_pixels(data).permute(1, 2, 0).numpy().tobytes(), name
        assert requests == []


@pytest.fixture(scope="module")
def llama_web_export(tiny_components, ort_web_tarball, tmp_path_factory):  # noqa: F811
    """A Llama-family caption model (grouped-query attention, rotary positions, Llama 3's kind of
    byte-level BPE), taught the colours, exported for ONNX Runtime and for the browser."""
    root = tmp_path_factory.mktemp("llama")
    decoder = build_decoder(root / "decoder", "llama")
    model_dir = build_image_dependent_model(root / "model", components=(tiny_components[0], decoder))
    export_onnx(model_dir, root / "onnx")
    export_web(root / "onnx", root / "web", ort_web_tarball=ort_web_tarball)
    return root / "onnx", root / "web"


def test_a_llama_family_model_gives_the_same_tokens(llama_web_export, images):
    onnx_dir, web_dir = llama_web_export
    model = OnnxCaptionModel.from_pretrained(onnx_dir, threads=1)
    chosen = images[:8] + images[-4:]
    greedy = python_tokens(model, chosen)
    beam = python_tokens(model, chosen, num_beams=3, num_return_sequences=3)
    assert len({str(rows) for rows in greedy}) >= 4
    with serve_folder(web_dir) as url, loaded_page(url) as (page, _):
        assert browser_tokens(page, chosen) == greedy
        assert browser_tokens(page, chosen, numBeams=3, numReturnSequences=3) == beam


def test_int4_tokens_equal_python_and_mostly_agree_with_float32(web_exports, python_models, images):  # noqa: F811
    expected, got = quantized_tokens("int4", web_exports["int4"], python_models["int4"], images)
    assert got == expected
    float32 = python_models["float32"]
    reference = python_tokens(float32, images) + python_tokens(float32, images, num_beams=3)
    agreement = sum(a == b for a, b in zip(expected, reference, strict=True)) / len(reference)
    assert agreement >= INT4_AGREEMENT, f"{agreement:.0%} of int4 captions are the float32 export's"
