"""One small captioned dataset written in every supported format, shared by the dataset and `prepare` tests;
and a measure of peak memory for the tests of hostile inputs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

# One logical dataset, written by the functions below in every format: (name, split, captions).
DATASET = [
    ("cat", "train", ("a cat on a mat", "a sleeping cat")),
    ("dog", "train", ("a dog runs",)),
    ("bird", "val", ("a bird in a tree", "a small bird")),
    ("fish", "test", ("a fish in water",)),
]


def png(name: str) -> bytes:
    """Distinct image bytes per name, so that reading the wrong file is noticed."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (len(name) * 40, ord(name[0]), 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.png").write_bytes(png(name))


def write_jsonl(root: Path) -> Path:
    write_images(root / "img", [name for name, _, _ in DATASET])
    lines = []
    for name, split, captions in DATASET:
        if len(captions) > 1 and name == "cat":  # one line per caption: merged into one record
            lines += [{"image": f"img/{name}.png", "caption": caption, "split": split} for caption in captions]
        else:
            lines.append({"image": f"img/{name}.png", "captions": list(captions), "split": split})
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")  # a trailing blank line is fine
    return path


def write_csv(root: Path) -> Path:
    write_images(root / "img", [name for name, _, _ in DATASET])
    path = root / "data.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption", "captions", "split"])
        for name, split, captions in DATASET:
            if name == "cat":  # `caption` rows, merged by image
                writer.writerows([f"img/{name}.png", caption, "", split] for caption in captions)
            else:
                writer.writerow([f"img/{name}.png", "", json.dumps(list(captions)), split])
    return path


def write_folder(root: Path) -> Path:
    for name, split, captions in DATASET:
        write_images(root / "photos" / split, [name])
        (root / "photos" / split / f"{name}.txt").write_text("\n".join(captions) + "\n\n")
    (root / "photos" / "train" / "uncaptioned.png").write_bytes(png("uncaptioned"))  # skipped
    return root / "photos"


def write_shards(folder: Path) -> Path:
    """One shard per split, named so that the split follows from the shard name."""
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        with wds.TarWriter(str(folder / f"{split}-000.tar")) as writer:
            for name, record_split, captions in DATASET:
                if record_split == split:
                    writer.write({"__key__": name, "png": png(name), "txt": "\n".join(captions)})
            writer.write({"__key__": f"{split}-lonely", "png": png("lonely")})  # no caption: skipped
    return folder


def write_karpathy(root: Path) -> Path:
    write_images(root / "train2014", ["cat", "dog"])
    write_images(root / "val2014", ["bird", "fish"])
    karpathy_split = {"cat": "train", "dog": "restval", "bird": "val", "fish": "test"}
    images = [
        {
            "filepath": "train2014" if split == "train" else "val2014",
            "filename": f"{name}.png",
            "cocoid": index,
            "split": karpathy_split[name],
            "sentences": [{"raw": caption + " ", "tokens": caption.split()} for caption in captions],
        }
        for index, (name, split, captions) in enumerate(DATASET)
    ]
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


WRITERS = {
    "jsonl": write_jsonl,
    "csv": write_csv,
    "folder": write_folder,
    "webdataset": lambda root: write_shards(root / "shards"),
    "karpathy": write_karpathy,
}


# For the tests that measure peak memory with `peak_memory_growth`.
measures_peak_memory = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures peak memory with Linux's /proc"
)


@contextmanager
def peak_memory_growth() -> Iterator[list[int]]:
    """How much this process's peak resident memory grew over the block (Linux /proc), in bytes."""

    def status(field: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak (VmHWM) starts again from here
    before, growth = status("VmRSS:"), []
    yield growth
    growth.append(status("VmHWM:") - before)
