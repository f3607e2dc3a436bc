"""Every dataset format reads into the same records; every malformed input is a one-line UserError."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from prefixcap.data import CaptionRecord, load_records, read_image_bytes, split_records
from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.sources import LocalPath, read_shard
from tests.helpers_data import DATASET, WRITERS, png, write_images, write_jsonl, write_karpathy, write_shards


def summary(records: list[CaptionRecord]) -> list[tuple[str, str, tuple[str, ...]]]:
    """Name, split and captions of each record: what every format must agree on."""
    return sorted((Path(record.image.rpartition("#")[2]).stem, record.split, record.captions) for record in records)


@pytest.mark.parametrize("format", sorted(WRITERS))
def test_every_format_reads_the_same_dataset(tmp_path: Path, format: str) -> None:
    path = WRITERS[format](tmp_path)

    records = load_records(path)

    assert summary(records) == sorted(DATASET)
    assert load_records(path, format=format) == records  # detection picked the same reader
    assert load_records(path) == records  # deterministic order
    assert len({record.image_id for record in records}) == len(records)
    for record in records:  # every image reference resolves to that image's bytes
        assert read_image_bytes(record.image) == png(Path(record.image.rpartition("#")[2]).stem)


def test_split_records_keeps_order_and_rejects_unknown_splits(tmp_path: Path) -> None:
    records = load_records(write_jsonl(tmp_path))

    assert [Path(record.image).stem for record in split_records(records, "train")] == ["cat", "dog"]
    assert [Path(record.image).stem for record in split_records(records, "test")] == ["fish"]
    with pytest.raises(ValueError, match="restval"):
        split_records(records, "restval")


def test_coco_layout_with_annotations_folder_and_split_subfolders(tmp_path: Path) -> None:
    write_images(tmp_path / "train2014", ["COCO_train2014_000000000009"])
    write_images(tmp_path / "val2014", ["COCO_val2014_000000000042"])
    (tmp_path / "annotations").mkdir()
    document = {
        "images": [
            {"id": 42, "file_name": "COCO_val2014_000000000042.png"},
            {"id": 9, "file_name": "COCO_train2014_000000000009.png"},
            {"id": 7, "file_name": "COCO_train2014_000000000007.png"},  # no captions: skipped
        ],
        "annotations": [
            {"id": 1, "image_id": 9, "caption": "A train at a station.\n"},
            {"id": 2, "image_id": 42, "caption": "A vase of flowers."},
            {"id": 3, "image_id": 9, "caption": "  A red train. "},
        ],
    }
    path = tmp_path / "annotations" / "captions_mixed2014.json"
    path.write_text(json.dumps(document))

    records = load_records(path)

    assert [(r.image_id, r.split, r.captions) for r in records] == [
        ("42", "val", ("A vase of flowers.",)),
        ("9", "train", ("A train at a station.", "A red train.")),
    ]
    assert records[1].image == str((tmp_path / "train2014" / "COCO_train2014_000000000009.png").absolute())
    assert read_image_bytes(records[0].image) == png("COCO_val2014_000000000042")


def test_coco_flat_images_root_and_split_from_file_name(tmp_path: Path) -> None:
    write_images(tmp_path / "pictures", ["a"])
    path = tmp_path / "captions_val2017.json"
    path.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "x"}]})
    )

    (record,) = load_records(path, images_root=tmp_path / "pictures")

    assert record.split == "val"
    assert read_image_bytes(record.image) == png("a")


def test_karpathy_folds_restval_into_train_and_uses_cocoid(tmp_path: Path) -> None:
    records = load_records(write_karpathy(tmp_path))

    by_name = {Path(record.image).stem: record for record in records}
    assert by_name["dog"].split == "train"  # restval
    assert by_name["dog"].image_id == "1"
    assert by_name["bird"].image == str((tmp_path / "val2014" / "bird.png").absolute())
    assert by_name["cat"].captions == ("a cat on a mat", "a sleeping cat")  # raw text, stripped


def test_jsonl_images_root_ids_and_defaults(tmp_path: Path) -> None:
    write_images(tmp_path / "elsewhere" / "sub", ["a", "b"])
    path = tmp_path / "data.jsonl"
    lines = [
        {"image": "sub/a.png", "caption": "first"},
        {"image": "sub/b.png", "caption": "second", "image_id": 17, "split": "validation"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines))

    a, b = load_records(path, images_root=tmp_path / "elsewhere")

    assert (a.image_id, a.split) == ("sub/a.png", "train")
    assert (b.image_id, b.split) == ("17", "val")
    assert read_image_bytes(b.image) == png("b")


def test_webdataset_patterns_single_shards_and_ids(tmp_path: Path) -> None:
    folder = write_shards(tmp_path / "shards")
    (folder / "train-000.tar").rename(folder / "part-000.tar")  # no split in the name: train
    (folder / "val-000.tar").rename(folder / "part-001.tar")
    (folder / "test-000.tar").rename(folder / "part-002.tar")

    by_braces = load_records(f"{folder}/part-{{000..002}}.tar")
    by_glob = load_records(str(folder / "part-*.tar"))
    single = load_records(folder / "part-001.tar")

    assert by_braces == by_glob == load_records(folder)
    assert {record.split for record in by_braces} == {"train"}
    assert [record.image_id for record in single] == ["part-001.tar#bird"]
    assert single[0].image == f"{folder / 'part-001.tar'}#bird.png"


def test_webdataset_split_from_shard_folders(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        with wds.TarWriter(str(tmp_path / split / "000.tar")) as writer:
            writer.write({"__key__": "x", "jpg": png(split), "txt": f"a {split} image"})

    records = load_records(tmp_path)

    assert [(r.image_id, r.split) for r in records] == [("train/000.tar#x", "train"), ("val/000.tar#x", "val")]
    assert read_image_bytes(records[1].image) == png("val")


def test_read_image_bytes_names_the_missing_image(tmp_path: Path) -> None:
    folder = write_shards(tmp_path / "shards")
    with pytest.raises(ImageLoadError, match="nope.png: no such file"):
        read_image_bytes(str(tmp_path / "nope.png"))
    with pytest.raises(ImageLoadError, match="has no member 'nope.png'"):
        read_image_bytes(f"{folder / 'train-000.tar'}#nope.png")


# Malformed inputs: (files to write, dataset to load, load_records kwargs, text the error must contain).
MALFORMED = {
    "missing file": ({}, "data.jsonl", {}, "data.jsonl: no such file"),
    "unknown format": ({"d.jsonl": "{}"}, "d.jsonl", {"format": "tfrecord"}, "unknown dataset format 'tfrecord'"),
    "unknown suffix": ({"d.txt": "x"}, "d.txt", {}, "d.txt: cannot tell the dataset format"),
    "bad json line": (
        {"d.jsonl": '{"image": "a.png", "caption": "x"}\n\n{oops\n'},
        "d.jsonl",
        {},
        "d.jsonl:3: invalid JSON",
    ),
    "not an object": ({"d.jsonl": "[1, 2]\n"}, "d.jsonl", {}, "d.jsonl:1: expected a JSON object"),
    "caption not a string": (
        {"d.jsonl": '{"image": "a.png", "caption": 5}'},
        "d.jsonl",
        {},
        "d.jsonl:1: caption must be a string",
    ),
    "empty caption": ({"d.jsonl": '{"image": "a.png", "caption": "  "}'}, "d.jsonl", {}, "d.jsonl:1: caption is empty"),
    "no image": ({"d.jsonl": '{"caption": "x"}'}, "d.jsonl", {}, "d.jsonl:1: needs an 'image' path"),
    "no caption": ({"d.jsonl": '{"image": "a.png"}'}, "d.jsonl", {}, "d.jsonl:1: needs exactly one of 'caption'"),
    "bad split": (
        {"d.jsonl": '{"image": "a.png", "caption": "x", "split": "holdout"}'},
        "d.jsonl",
        {},
        "d.jsonl:1: split 'holdout'",
    ),
    "split conflict": (
        {"d.jsonl": '{"image": "a.png", "caption": "x"}\n{"image": "a.png", "caption": "y", "split": "val"}'},
        "d.jsonl",
        {},
        "d.jsonl:2: image ",
    ),
    "duplicate id": (
        {
            "d.jsonl": '{"image": "a.png", "caption": "x", "image_id": 1}\n{"image": "b.png", "caption": "y", "image_id": 1}'
        },
        "d.jsonl",
        {},
        "d.jsonl: image_id '1' is used by more than one image",
    ),
    "empty jsonl": ({"d.jsonl": "\n"}, "d.jsonl", {}, "d.jsonl: no captioned images found"),
    "not utf-8": ({"d.jsonl": b'{"image": "\xff"}'}, "d.jsonl", {}, "d.jsonl: not UTF-8 text"),
    "csv missing column": ({"d.csv": "path,caption\na.png,x\n"}, "d.csv", {}, "d.csv: needs an 'image' column"),
    "csv bad captions": ({"d.csv": "image,captions\na.png,x\n"}, "d.csv", {}, "d.csv:2: 'captions' is not a JSON list"),
    "coco invalid json": ({"c.json": '{"images": [}'}, "c.json", {}, "c.json:1: invalid JSON"),
    "coco unknown image": (
        {"c.json": json.dumps({"images": [], "annotations": [{"image_id": 3, "caption": "x"}]})},
        "c.json",
        {},
        "c.json: annotations[0] names image_id 3",
    ),
    "forced coco": (
        {"c.json": json.dumps({"images": []})},
        "c.json",
        {"format": "coco"},
        "c.json: not a COCO caption file",
    ),
    "karpathy no sentences": (
        {"k.json": json.dumps({"images": [{"filename": "a.png", "split": "train"}]})},
        "k.json",
        {},
        "k.json: images[0] needs a 'sentences' list",
    ),
    "json without images": ({"k.json": "[]"}, "k.json", {}, "k.json: expected a JSON object with an 'images' list"),
    "folder without captions": ({"pics/a.png": b"x"}, "pics", {}, "pics: no captioned images found"),
    "caption file not utf-8": ({"pics/a.png": b"x", "pics/a.txt": b"\xff"}, "pics", {}, "a.txt: not UTF-8 text"),
    "no shards match": ({}, "s-{0..3}.tar", {}, "s-0.tar: no such shard file"),
    "glob matches nothing": ({}, "s-*.tar", {}, "s-*.tar: no file matches"),
    "not a tar": ({"s.tar": b"not a tar at all" * 100}, "s.tar", {}, "s.tar: not an uncompressed tar file"),
    # Python's own limits on nesting and CSV fields, met by hostile files.
    "deeply nested json line": (
        {"d.jsonl": "[" * 100_000},
        "d.jsonl",
        {},
        "d.jsonl:1: invalid JSON (nested too deeply)",
    ),
    "deeply nested coco": (
        {"c.json": '{"images": ' + "[" * 100_000},
        "c.json",
        {},
        "c.json: invalid JSON (nested too deeply)",
    ),
    "deeply nested csv captions": (
        {"d.csv": "image,captions\na.png," + "[" * 100_000 + "\n"},
        "d.csv",
        {},
        "d.csv:2: 'captions' is not a JSON list (nested too deeply)",
    ),
    "csv cell over the field limit": (
        {"d.csv": "image,caption\na.png," + "x" * 200_000 + "\n"},
        "d.csv",
        {},
        "d.csv:2: not valid CSV (field larger than field limit",
    ),
    "imagefolder csv cell over the field limit": (
        {"ds/metadata.csv": "file_name,text\na.png," + "x" * 200_000 + "\n"},
        "ds",
        {},
        "metadata.csv:2: not valid CSV (field larger than field limit",
    ),
    "imagefolder csv header over the field limit": (
        {"ds/metadata.csv": "file_name," + "x" * 200_000 + "\na.png,x\n"},
        "ds",
        {},
        "metadata.csv:1: not valid CSV (field larger than field limit",
    ),
    "imagefolder nested json line": (
        {"ds/metadata.jsonl": "[" * 100_000},
        "ds",
        {},
        "metadata.jsonl:1: invalid JSON (nested too deeply)",
    ),
    "imagefolder names no file": (
        {"ds/metadata.jsonl": '{"file_name": ".", "text": "x"}'},
        "ds",
        {},
        "metadata.jsonl:1: file name '.' names no image file",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_is_a_one_line_error_naming_the_file(tmp_path: Path, case: str) -> None:
    files, target, kwargs, expected = MALFORMED[case]
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content)

    with pytest.raises(UserError) as raised:
        load_records(tmp_path / target, **kwargs)

    message = str(raised.value)
    assert expected in message
    assert "\n" not in message
    if case != "unknown format":  # the only error about an argument rather than a file
        assert str(tmp_path) in message


@pytest.mark.parametrize("format", ["folder", "webdataset"])
def test_uncaptioned_samples_are_skipped_with_a_warning(
    tmp_path: Path, format: str, caplog: pytest.LogCaptureFixture
) -> None:
    records = load_records(WRITERS[format](tmp_path))

    assert summary(records) == sorted(DATASET)  # not the `lonely` / `uncaptioned` images
    expected = 1 if format == "folder" else 3  # the folder has one such image, each shard one
    assert [record.message.split(": ")[-1] for record in caplog.records] == [
        "skipped 1 samples without an image or a non-empty caption .txt"
    ] * expected


def sparse_tar(path: Path, member: str, size: int) -> Path:
    """A tar holding one member of `size` zero bytes, stored sparse: no disk space for the data."""
    info = tarfile.TarInfo(member)
    info.size = size
    with open(path, "wb") as file:
        file.write(info.tobuf())
        file.truncate(tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)
    return path


@pytest.mark.timeout(30)  # a FIFO used to block open() until a writer came
def test_image_reads_open_only_regular_files_and_cap_their_size(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(ImageLoadError, match=r"fifo.png: not a regular file \(a FIFO\)$"):
        read_image_bytes(str(fifo))
    with pytest.raises(ImageLoadError, match=r"zero.png: not a regular file \(a character device\)$"):
        read_image_bytes(str(tmp_path / "zero.png"))
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as file:
        file.truncate(2**31)  # sparse
    with pytest.raises(ImageLoadError, match=r"huge.png: 2,147,483,648 bytes, over the [\d,]+-byte limit"):
        read_image_bytes(str(huge))


@pytest.mark.timeout(30)
def test_shards_are_regular_files_and_their_members_are_capped(tmp_path: Path) -> None:
    from prefixcap.inputs.images import MAX_IMAGE_BYTES

    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match=r"fifo.tar#a.png: .*fifo.tar: not a regular file \(a FIFO\)$"):
        read_image_bytes(f"{fifo}#a.png")
    with pytest.raises(ImageLoadError, match=r"fifo.tar: not a regular file \(a FIFO\)$"):
        list(read_shard(LocalPath(fifo)))

    size = MAX_IMAGE_BYTES + 1
    shard = sparse_tar(tmp_path / "big.tar", "big.png", size)
    with pytest.raises(ImageLoadError, match=rf"big.tar#big.png: {size:,} bytes, over the [\d,]+-byte limit"):
        read_image_bytes(f"{shard}#big.png")
    ((name, reason),) = read_shard(LocalPath(shard))  # streamed: skipped unread
    assert (
        name == f"{shard}#big.png" and reason == f"{size:,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit for an image"
    )


def escaping_dataset(root: Path, layout: str) -> tuple[Path, Path]:
    """(a dataset in `root/ds/` naming one image outside it the way `layout` does, that image)."""
    write_images(root / "outside", ["private"])
    secret, folder = root / "outside" / "private.png", root / "ds"
    folder.mkdir()
    name = "../outside/private.png"
    if layout == "jsonl absolute":
        name = str(secret)
    elif layout == "jsonl through a link":
        (folder / "img").symlink_to(root / "outside")
        name = "img/private.png"
    elif layout == "jsonl through a linked file":
        (folder / "private.png").symlink_to(secret)
        name = "private.png"
    if layout.startswith("jsonl"):
        (folder / "data.jsonl").write_text(json.dumps({"image": name, "caption": "x"}) + "\n")
        return folder / "data.jsonl", secret
    if layout == "csv":
        (folder / "data.csv").write_text(f"image,caption\n{name},x\n")
        return folder / "data.csv", secret
    if layout == "coco":
        document = {"images": [{"id": 1, "file_name": name}], "annotations": [{"image_id": 1, "caption": "x"}]}
        (folder / "captions.json").write_text(json.dumps(document))
        return folder / "captions.json", secret
    image = {"filepath": "..", "filename": "outside/private.png", "split": "test", "sentences": [{"raw": "x"}]}
    (folder / "karpathy.json").write_text(json.dumps({"images": [image]}))
    return folder / "karpathy.json", secret


ESCAPES = ["jsonl", "jsonl absolute", "jsonl through a link", "jsonl through a linked file", "csv", "coco", "karpathy"]


@pytest.mark.parametrize("layout", ESCAPES)
def test_image_paths_stay_inside_the_dataset_root_unless_allowed(tmp_path: Path, layout: str) -> None:
    dataset, secret = escaping_dataset(tmp_path, layout)
    with pytest.raises(UserError) as refused:
        load_records(dataset)
    message = str(refused.value)
    assert message.startswith(f"{dataset}:") and "\n" not in message
    assert f"is outside the dataset's root {tmp_path / 'ds'} (through links too); --allow-outside-root" in message

    (record,) = load_records(dataset, allow_outside_root=True)
    assert read_image_bytes(record.image) == png("private")
    if layout == "jsonl absolute":  # an --images-root that holds it
        (record,) = load_records(dataset, images_root=secret.parent)
        assert record.image == str(secret)
