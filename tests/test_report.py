"""The HTML report: valid, self-contained, escaped, and holding the examples."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from prefixcap.evaluation.outputs import write_outputs
from prefixcap.evaluation.references import Sample
from prefixcap.evaluation.report import render_report
from prefixcap.evaluation.scoring import Evaluation

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr"}


class Checker(HTMLParser):
    """Checks tag nesting and collects what the report loads and shows."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.assets: list[str] = []  # every src/href
        self.tags: list[str] = []
        self.text: list[str] = []
        self.sections: list[tuple[str, list[str]]] = []  # (h2 heading, captions after it)
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.assets += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "h2":
            self._in = "h2"
        elif tag == "p" and ("class", "caption") in attrs:
            self._in = "caption"

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag in ("h2", "p"):
            self._in = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in == "h2":
            self.sections.append((data, []))
        elif self._in == "caption" and self.sections:
            self.sections[-1][1].append(data)


@pytest.fixture
def evaluation(tmp_path: Path) -> Evaluation:
    samples = []
    for n in range(10):
        image = tmp_path / f"{n}.jpg"
        Image.new("RGB", (300, 200), (25 * n, 100, 200)).save(image)
        samples.append(Sample(str(n), f"caption {n} & <more>", (f"ref {n} a", f"ref {n} b"), str(image)))
    samples.append(Sample("10", "<script>alert(1)</script>", ("a 'quoted' \"ref\"",), str(tmp_path / "missing.jpg")))
    evaluation = Evaluation(
        samples,
        per_image={s.image_id: {"CIDEr": 10.0 * ((3 * i) % 11), "CLIPScore": 0.7} for i, s in enumerate(samples)},
    )
    evaluation.metrics = {"BLEU-4": 30.5, "CIDEr": 101.0, "BERTScore-F1": 0.91, "CLIPScore": 0.7, "vocab_size": 42}
    evaluation.skipped = {"SPICE": "no CoreNLP <offline>"}
    evaluation.settings = {"tokenization": "ptb"}
    return evaluation


def test_report_is_valid_self_contained_html(evaluation: Evaluation) -> None:
    document = render_report(evaluation, num_examples=5, num_extremes=3)
    checker = Checker()
    checker.feed(document)
    checker.close()
    assert checker.stack == []  # every tag closed, in order
    assert document.startswith("<!DOCTYPE html>")
    assert checker.assets and all(asset.startswith("data:image/") for asset in checker.assets)
    assert "http://" not in document and "https://" not in document
    assert "script" not in checker.tags  # captions are escaped, not executed
    text = "".join(checker.text)
    assert "<script>alert(1)</script>" in text and "caption 3 & <more>" in text
    assert "no CoreNLP <offline>" in text and "image not available" in text
    for published in ("32.15", "108.35", "113.08", "0.9060"):  # ClipCap's and the seed's figures
        assert published in text


def test_report_ranks_examples_by_per_image_cider(evaluation: Evaluation) -> None:
    checker = Checker()
    checker.feed(render_report(evaluation, num_examples=4, num_extremes=3))
    sections = dict(checker.sections)
    by_cider = sorted(evaluation.samples, key=lambda s: evaluation.per_image[s.image_id]["CIDEr"])
    assert sections["Best 3 by per-image CIDEr"] == [s.caption for s in by_cider[::-1][:3]]
    assert sections["Worst 3 by per-image CIDEr"] == [s.caption for s in by_cider[:3]]
    assert len(sections["4 random examples"]) == 4
    # One thumbnail per card, except for the sample whose image is missing.
    cards = [caption for _, captions in checker.sections for caption in captions]
    with_image = [caption for caption in cards if caption != evaluation.samples[-1].caption]
    assert sum(asset.startswith("data:image/jpeg") for asset in checker.assets) == len(with_image) < len(cards)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium")
def test_report_opens_from_disk_without_network(evaluation: Evaluation, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    out = write_outputs(tmp_path / "eval", evaluation)
    assert {p.name for p in out.iterdir()} == {"metrics.json", "per_image.json", "report.html"}
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto((out / "report.html").as_uri())
        widths = page.evaluate("Array.from(document.images).map(image => image.complete ? image.naturalWidth : 0)")
        captions = page.locator(".caption").all_inner_texts()
        browser.close()
    assert requests == [(out / "report.html").as_uri()]  # nothing else was fetched
    assert widths and all(width > 0 for width in widths)  # histogram and thumbnails decoded
    assert "caption 0 & <more>" in captions


def test_worst_examples_are_only_captions_that_miss_their_references(tmp_path: Path) -> None:
    """With fewer imperfect captions than places, "Worst 6" filled up with perfect ones
    (a caption equal to a reference can still rank low by CIDEr, whose weights vary per image)."""
    samples = [Sample(str(n), f"a shape {n}", (f"a shape {n}",), None) for n in range(8)]  # all right...
    samples += [Sample("8", "a wrong caption", ("a shape 8",), None)]  # ...but this one
    per_image = {s.image_id: {"CIDEr": float(n)} for n, s in enumerate(samples)}
    per_image["8"]["CIDEr"] = 1.5  # ranks above perfect captions 0 and 1
    metrics = {"CIDEr": 4.0}
    checker = Checker()
    checker.feed(render_report(Evaluation(samples, metrics, per_image), num_examples=0, num_extremes=6))
    sections = dict(checker.sections)
    assert sections["Best 6 by per-image CIDEr"] == [f"a shape {n}" for n in (7, 6, 5, 4, 3, 2)]
    assert sections["Worst 1 by per-image CIDEr (of 1 caption that matches no reference)"] == ["a wrong caption"]

    perfect = [s for s in samples if s.image_id != "8"]
    checker = Checker()
    checker.feed(render_report(Evaluation(perfect, metrics, per_image), num_examples=0, num_extremes=6))
    assert not [heading for heading, _ in checker.sections if heading.startswith("Worst")]
    assert "Every caption equals one of its references." in "".join(checker.text)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium")
def test_thumbnails_show_the_whole_image(tmp_path: Path) -> None:
    """Cards cropped thumbnails to fill a wide box, cutting the top and bottom off square
    images. A square image with a red top band and a blue bottom band must show both."""
    from playwright.sync_api import sync_playwright

    square = Image.new("RGB", (64, 64), (0, 160, 0))
    square.paste((255, 0, 0), (0, 0, 64, 8))
    square.paste((0, 0, 255), (0, 56, 64, 64))
    square.save(tmp_path / "square.png")
    samples = [Sample("0", "a square", ("a square",), str(tmp_path / "square.png"))]
    out = write_outputs(tmp_path / "eval", Evaluation(samples, per_image={"0": {}}), num_examples=1)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((out / "report.html").as_uri())
        page.locator(".card img").first.screenshot(path=str(tmp_path / "card.png"))
        browser.close()
    shown = Image.open(tmp_path / "card.png").convert("RGB")
    colours = {colour for _, colour in shown.getcolors(shown.width * shown.height)}
    near = lambda target: any(sum(abs(a - b) for a, b in zip(colour, target)) < 90 for colour in colours)
    assert near((255, 0, 0)) and near((0, 0, 255)) and near((0, 160, 0))
