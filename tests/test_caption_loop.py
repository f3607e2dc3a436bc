"""The caption loop (`prefixcap.pipeline.loop`): every way of captioning runs its one step,
`caption_batch`, and a request's options are checked once, where the request is made."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from prefixcap import Captioner
from prefixcap.cli import main
from prefixcap.data import CaptionRecord
from prefixcap.evaluation import caption_records
from prefixcap.options import GenerationOptions, TextOptions
from prefixcap.pipeline import loop
from prefixcap.serving import ServerConfig, create_app
from prefixcap.serving.app import CAPTION_PATH

QUICK = ["--max-new-tokens", "3", "--workers", "0", "--dtype", "float32"]


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """The number of images of each call of the loop's step, recorded as it runs."""
    calls: list[int] = []
    step = loop.caption_batch

    def recorded(model, request, **inputs):
        batch = next(tensor for tensor in (inputs.get("pixels"), inputs.get("image_embeds")) if tensor is not None)
        calls.append(len(batch))
        return step(model, request, **inputs)

    monkeypatch.setattr(loop, "caption_batch", recorded)
    return calls


@pytest.fixture
def photos(tmp_path: Path, example_images: list[Path]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in example_images[:3]:
        shutil.copy(path, folder)
    return folder


def test_every_driver_runs_the_one_loop(tiny_model_dir: Path, photos: Path, tmp_path: Path, steps: list[int]) -> None:
    """File output, folder parts, sidecars, evaluation (from images and from stored embeddings), the
    server and the Python API each caption through `caption_batch`."""
    model = ["--model", str(tiny_model_dir), *QUICK]
    runs = {
        "file": lambda: main(["caption", str(photos), *model, "--output", str(tmp_path / "out.jsonl")]),
        "folder parts": lambda: main(["caption", str(photos), *model, "--output", f"{tmp_path / 'parts'}/"]),
        "sidecars": lambda: main(["caption", str(photos), *model, "--sidecar-dir", str(tmp_path / "sidecars")]),
    }
    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    records = [CaptionRecord(path.name, str(path), ("a caption",), "test") for path in sorted(photos.iterdir())]
    embeddings = captioner.model.encode_pixels(captioner.loader.load(records[0].image).unsqueeze(0))
    runs["evaluation, images"] = lambda: caption_records(captioner, records, workers=0, max_new_tokens=3)
    runs["evaluation, embeddings"] = lambda: caption_records(
        captioner, records[:1], embeddings=embeddings, max_new_tokens=3
    )
    runs["python api"] = lambda: captioner([records[0].image], max_new_tokens=3)

    def server() -> None:
        app = create_app(captioner, ServerConfig(model_name="tiny"))
        with TestClient(app) as client:
            data = Path(records[0].image).read_bytes()
            answer = client.post(CAPTION_PATH, files=[("images", ("a.jpg", data))], data={"max_new_tokens": "3"})
            assert answer.status_code == 200, answer.text

    runs["server"] = server
    for name, run in runs.items():
        steps.clear()
        run()
        assert sum(steps) == (1 if name in ("evaluation, embeddings", "python api", "server") else 3), name


def test_a_requests_options_are_checked_once(tiny_model_dir: Path, photos: Path, monkeypatch) -> None:
    """Building the request checks its decoding options (one GenerationOptions) and text options
    (one TextOptions); nothing between the entry point and the engine checks them again: the
    engine's spec holds the very options the request checked."""
    built: list[str] = []
    for schema in (GenerationOptions, TextOptions):
        check = schema.__post_init__

        def counted(self, check=check) -> None:
            built.append(type(self).__name__)
            check(self)

        monkeypatch.setattr(schema, "__post_init__", counted)
    from prefixcap.engine import backends

    reached = []
    generate = backends.generate
    monkeypatch.setattr(
        backends,
        "generate",
        lambda decoder, prefix, spec, *lengths: (
            reached.append(spec.options) or generate(decoder, prefix, spec, *lengths)
        ),
    )

    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    images = [str(path) for path in sorted(photos.iterdir())]
    for entry in ("python api", "server", "request given"):
        built.clear()
        reached.clear()
        if entry == "python api":
            captioner(images, batch_size=2, num_beams=2, max_new_tokens=3, prefix="sks, ")
        elif entry == "server":
            app = create_app(captioner, ServerConfig(model_name="tiny"))
            with TestClient(app) as client:
                built.clear()  # (serving checks the model's defaults at start-up)
                files = [("images", (Path(image).name, Path(image).read_bytes())) for image in images]
                answer = client.post(CAPTION_PATH, files=files, data={"num_beams": "2", "max_new_tokens": "3"})
                assert answer.status_code == 200, answer.text
        else:
            request = captioner.request(num_beams=2, max_new_tokens=3)
            built.clear()
            list(captioner.stream(images, batch_size=2, workers=0, request=request))
            assert all(options is request.generation for options in reached)
        assert sorted(built) == ([] if entry == "request given" else ["GenerationOptions", "TextOptions"]), entry
        assert len({id(options) for options in reached}) == 1 and reached, entry  # the same object, every batch
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.generation.num_beams = 3
