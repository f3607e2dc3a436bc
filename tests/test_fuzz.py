"""Fuzz-style robustness: a few hundred generated malformed inputs (truncated files, random bytes,
wrong types) go through the image loader, the dataset readers and the server's request parsing.
Each one is either accepted or refused with a one-line error; nothing raises anything else.

The generator is seeded and the counts are fixed, so a failure reproduces exactly."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from prefixcap.data import CaptionRecord
from prefixcap.data.formats import load_records
from prefixcap.errors import UserError
from prefixcap.inputs.images import load_image

SEED = 1234
CASES_PER_TARGET = 120


def _encoded_images() -> list[bytes]:
    """Small valid images in every format the loader meets, to cut and corrupt."""
    rng = np.random.default_rng(SEED)
    pixels = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    images = []
    for fmt, mode in [
        ("JPEG", "RGB"),
        ("PNG", "RGBA"),
        ("GIF", "P"),
        ("WEBP", "RGB"),
        ("BMP", "RGB"),
        ("TIFF", "CMYK"),
    ]:
        buffer = io.BytesIO()
        pixels.convert(mode).save(buffer, fmt)
        images.append(buffer.getvalue())
    return images


def _mutations(data: bytes, rng: random.Random) -> Iterator[bytes]:
    """Truncations, flipped bytes, random garbage and spliced headers of one valid file."""
    yield data[: rng.randrange(0, len(data))]
    flipped = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
    yield bytes(flipped)
    yield rng.randbytes(rng.randint(1, 512))
    yield data[:16] + rng.randbytes(rng.randint(0, 256))


def _one_line(error: Exception) -> bool:
    message = str(error)
    return bool(message) and "\n" not in message and "Traceback" not in message


def _assert_accepted_or_one_line(call: Callable[[], Any], case: str, accepted: Callable[[Any], bool]) -> bool:
    """Whether `call` accepted its input; an accepted input's result must pass `accepted`, a
    refused one must raise a one-line UserError."""
    try:
        result = call()
    except UserError as error:  # ImageLoadError and ModelLoadError are UserErrors
        assert _one_line(error), f"{case}: multi-line error {error!r}"
        return False
    assert accepted(result), f"{case}: accepted, but gave {result!r}"
    return True


def _is_rgb_image(image: Any) -> bool:
    return isinstance(image, Image.Image) and image.mode == "RGB" and image.width > 0 and image.height > 0


def _are_records(records: Any) -> bool:
    return isinstance(records, list) and all(
        isinstance(record, CaptionRecord) and record.captions and all(isinstance(c, str) for c in record.captions)
        for record in records
    )


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # PIL warns about the corrupt metadata it skips
def test_image_loader_survives_malformed_inputs() -> None:
    rng = random.Random(SEED)
    valid = _encoded_images()
    cases: list[Any] = [
        m for _ in range(CASES_PER_TARGET // (4 * len(valid)) + 1) for d in valid for m in _mutations(d, rng)
    ]
    cases += [b"", None, 42, 3.5, {"a": 1}, ["x"], np.zeros((0, 5)), np.full((4, 4), np.nan), np.zeros((2, 2, 7))]
    accepted = [
        _assert_accepted_or_one_line(
            lambda s=source: load_image(s, max_pixels=1_000_000), f"loader case {index}", _is_rgb_image
        )
        for index, source in enumerate(cases)
    ]
    assert any(accepted) and not all(accepted)  # both branches were taken


def _dataset_files(root: Path, rng: random.Random) -> Iterator[Path]:
    """Malformed caption datasets: broken JSON, wrong types, bad CSV, truncated and random tars."""
    good_jsonl = "\n".join(json.dumps({"image": f"{i}.jpg", "caption": f"caption {i}"}) for i in range(4))
    good_coco = json.dumps(
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "a cat"}]}
    )
    wrong_values = [None, 3, 2.5, [], {}, "", ["x", 1], {"nested": {"deep": []}}, "\x00", 10**30]
    for index in range(CASES_PER_TARGET):
        kind = index % 6
        path = root / f"case{index}"
        if kind == 0:  # cut JSON lines
            path = path.with_suffix(".jsonl")
            path.write_text(good_jsonl[: rng.randrange(len(good_jsonl))])
        elif kind == 1:  # right keys, wrong value types
            path = path.with_suffix(".jsonl")
            record = {"image": rng.choice(wrong_values + ["x.jpg"]), "caption": rng.choice(wrong_values + ["ok"])}
            if rng.random() < 0.5:
                record["split"] = rng.choice(wrong_values)
            path.write_text(json.dumps(record, default=str))
        elif kind == 2:  # COCO documents with a broken part
            path = path.with_suffix(".json")
            document = json.loads(good_coco)
            target = rng.choice(["images", "annotations"])
            document[target] = rng.choice(wrong_values + [[rng.choice(wrong_values)]])
            path.write_text(json.dumps(document, default=str))
        elif kind == 3:  # random bytes where text belongs
            path = path.with_suffix(rng.choice([".json", ".jsonl", ".csv"]))
            path.write_bytes(rng.randbytes(rng.randint(1, 300)))
        elif kind == 4:  # CSV with missing or extra columns
            path = path.with_suffix(".csv")
            header = rng.choice(["image,caption", "caption", "image", "image,caption,split", ""])
            rows = [",".join(rng.choice(["a.jpg", "", '"', "x,y", "cap"]) for _ in range(rng.randint(0, 4)))]
            path.write_text("\n".join([header, *rows]) + "\n")
        else:  # truncated or random WebDataset shards
            path = path.with_suffix(".tar")
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for name, data in [("0.jpg", b"\xff\xd8"), ("0.txt", b"a caption"), ("1.txt", rng.randbytes(8))]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            data = buffer.getvalue()
            path.write_bytes(data[: rng.randrange(len(data))] if rng.random() < 0.7 else rng.randbytes(1024))
        yield path


def test_dataset_readers_survive_malformed_files(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    for path in _dataset_files(tmp_path, rng):
        _assert_accepted_or_one_line(lambda p=path: load_records(p), path.name, _are_records)
