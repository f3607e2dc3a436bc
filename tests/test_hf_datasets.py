"""Hugging Face datasets in and out: imagefolder trees, Parquet files written by `datasets`, hub
ids, `datasets.Dataset` objects, and Parquet output that `datasets.load_dataset` reads back."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from PIL import Image

from prefixcap import Captioner
from prefixcap.cli import main
from prefixcap.data import CaptionRecord, load_records, read_image_bytes
from prefixcap.data.synth import make_synthetic_dataset
from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.expand import expand_inputs
from prefixcap.inputs.loader import read_image
from prefixcap.inputs.sources import StoredImage
from prefixcap.pipeline.features import FeatureStore
from prefixcap.testing import COLOURS, colour_image
from tests.helpers_data import measures_peak_memory, peak_memory_growth
from tests.reference import captions_one_by_one

datasets = pytest.importorskip("datasets")
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # ours -> the folder names HF uses


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> list[CaptionRecord]:
    """24 synthetic colour images (train, val, test) with one caption each."""
    captions = make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_images=24, image_size=16)
    return load_records(captions)


def write_imagefolder(records: list[CaptionRecord], root: Path, metadata: str, caption_column: str) -> Path:
    """An imagefolder tree as `datasets` reads it: one folder per split, each with its metadata file."""
    for split, folder in HF_SPLITS.items():
        rows = [record for record in records if record.split == split]
        (root / folder).mkdir(parents=True)
        for record in rows:
            shutil.copy(record.image, root / folder)
        table = [{"file_name": Path(record.image).name, caption_column: record.captions[0]} for record in rows]
        if metadata == "metadata.jsonl":
            (root / folder / metadata).write_text("".join(json.dumps(row) + "\n" for row in table))
        else:
            lines = [f"file_name,{caption_column}"] + [f"{row['file_name']},{row[caption_column]}" for row in table]
            (root / folder / metadata).write_text("\n".join(lines) + "\n")
    return root


def write_parquet(records: list[CaptionRecord], root: Path, *, embed: bool = True) -> Path:
    """`data/SPLIT-00000-of-00001.parquet` files as on the hub, written by `datasets` with `embed`
    (the image structs hold the bytes), else holding only the paths of copies in `data/images/`."""
    if not embed:
        (root / "data" / "images").mkdir(parents=True)
        for record in records:
            shutil.copy(record.image, root / "data" / "images")
    for split, name in HF_SPLITS.items():
        rows = [record for record in records if record.split == split]
        file = root / "data" / f"{name}-00000-of-00001.parquet"
        if not embed:
            path_parquet(file, [f"images/{Path(r.image).name}" for r in rows], [r.captions[0] for r in rows])
            continue
        images = [{"bytes": Path(r.image).read_bytes(), "path": Path(r.image).name} for r in rows]
        columns = {"image": images, "text": [r.captions[0] for r in rows]}
        dataset = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
        dataset.to_parquet(str(file))
    return root


def path_parquet(file: Path, paths: list[str], captions: list[str] | None = None) -> Path:
    """A Parquet dataset whose image structs hold only paths, as `datasets` writes unembedded images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.array(
        [{"bytes": None, "path": path} for path in paths], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    captions = captions or [f"caption {n}" for n in range(len(paths))]
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": image, "text": captions}), file)
    return file


def as_expected(records: list[CaptionRecord]) -> dict[bytes, tuple[tuple[str, ...], str]]:
    """{image bytes: (captions, split)}: what any layout of the synthetic data must read as."""
    return {read_image_bytes(record.image): (record.captions, record.split) for record in records}


# ------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize(
    ("build", "kind"),
    [
        (lambda records, root: write_imagefolder(records, root, "metadata.jsonl", "text"), "imagefolder"),
        (lambda records, root: write_imagefolder(records, root, "metadata.csv", "caption"), "imagefolder"),
        (lambda records, root: write_parquet(records, root), "parquet"),
        (lambda records, root: write_parquet(records, root, embed=False), "parquet"),
    ],
    ids=["imagefolder-jsonl", "imagefolder-csv", "parquet-bytes", "parquet-paths"],
)
def test_hf_layouts_read_as_the_same_records(synth, tmp_path: Path, build, kind: str) -> None:
    root = build(synth, tmp_path / "dataset")
    records = load_records(root)
    assert as_expected(records) == as_expected(synth)  # every image once, with its caption and split
    assert len({record.image_id for record in records}) == len(records)
    assert load_records(root, format=kind) == records
    if kind == "parquet":  # a single file is a dataset too
        test = load_records(next((root / "data").glob("test-*.parquet")))
        assert as_expected(test) == as_expected([record for record in synth if record.split == "test"])


def test_imagefolder_layout_is_the_one_datasets_reads(synth, tmp_path: Path) -> None:
    root = write_imagefolder(synth, tmp_path / "dataset", "metadata.jsonl", "text")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(root))
    assert {name: len(split) for name, split in loaded.items()} == {"train": 20, "validation": 2, "test": 2}
    assert {record.split for record in load_records(root)} == {"train", "val", "test"}


def test_parquet_images_are_read_one_row_at_a_time(synth, tmp_path: Path) -> None:
    root = write_parquet(synth, tmp_path / "dataset")
    sources, missing = expand_inputs([str(root)])
    assert missing == [] and len(sources) == len(synth) and all(isinstance(s, StoredImage) for s in sources)
    first = sources[0]
    assert first.endswith("test-00000-of-00001.parquet#row=0")
    first_test = next(record for record in synth if record.split == "test")
    assert read_image_bytes(first) == Path(first_test.image).read_bytes()
    with pytest.raises(ImageLoadError, match=r"has no row 99 \(2 rows\)"):
        read_image_bytes(first.replace("#row=0", "#row=99"))


def test_columns_can_be_chosen_and_bad_ones_are_one_line(synth, tmp_path: Path, capsys) -> None:
    root = tmp_path / "dataset"
    root.mkdir()
    columns = {"img": [r.image for r in synth], "sentences": [[r.captions[0], "another"] for r in synth]}
    dataset = datasets.Dataset.from_dict(columns).cast_column("img", datasets.Image())
    dataset.to_parquet(str(root / "all.parquet"))

    # (the images are the synthetic set's, outside this dataset's folder)
    records = load_records(root, allow_outside_root=True)  # img and sentences are among the defaults
    assert all(record.captions[1] == "another" for record in records)
    with pytest.raises(UserError, match=r"no caption column 'nope' \(columns: img, sentences\)$"):
        load_records(root, caption_column="nope")

    unlabelled = tmp_path / "unlabelled.parquet"  # hub test splits often have no captions
    texts = [None if n % 2 else record.captions[0] for n, record in enumerate(synth)]
    datasets.Dataset.from_dict({"image": [r.image for r in synth], "text": texts}).to_parquet(str(unlabelled))
    assert len(load_records(unlabelled, allow_outside_root=True)) == len(synth) // 2

    bare = tmp_path / "bare.parquet"
    datasets.Dataset.from_dict({"picture": [r.image for r in synth], "label": [1] * len(synth)}).to_parquet(str(bare))
    capsys.readouterr()  # the progress bars of `datasets`
    assert main(["prepare", str(bare), "--out", str(tmp_path / "features")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "no image column among image, img, file_name; pick one of (picture, label) with --image-column" in error
    with pytest.raises(UserError, match="columns can be chosen for imagefolder and parquet datasets, not jsonl"):
        load_records(Path(synth[0].image).parent.parent / "captions.jsonl", image_column="image")


def test_hub_ids_resolve_through_snapshot_download(synth, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    local = write_parquet(synth, tmp_path / "snapshot")
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    records = load_records("hf://datasets/someone/colours@v1.0")
    assert as_expected(records) == as_expected(synth)
    ((repo_id, kwargs),) = calls
    assert (repo_id, kwargs["repo_type"], kwargs["revision"]) == ("someone/colours", "dataset", "v1.0")
    assert "*.parquet" in kwargs["allow_patterns"]

    sources, _ = expand_inputs(["hf://datasets/someone/colours/data"])  # a folder of the repository
    assert len(sources) == len(synth) and calls[-1][1]["revision"] is None
    assert all(pattern.startswith("data") for pattern in calls[-1][1]["allow_patterns"])
    with pytest.raises(UserError, match="expected hf://datasets/OWNER/NAME"):
        load_records("hf://datasets/just-a-name")


def test_a_hub_imagefolder_may_link_into_its_cache_but_not_out(synth, tmp_path: Path, monkeypatch) -> None:
    """The hub cache keeps each file in `blobs/` and links it from `snapshots/REV/`: those links stay
    inside the dataset's folder in the cache; one that leaves it is refused."""
    import huggingface_hub

    repo = tmp_path / "hub" / "datasets--someone--colours"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    rows = []
    for n, record in enumerate(synth[:3]):
        shutil.copy(record.image, blobs / f"blob{n}")
        (snapshot / f"{n}.png").symlink_to(f"../../blobs/blob{n}")
        rows.append({"file_name": f"{n}.png", "text": record.captions[0]})
    (snapshot / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(snapshot))
    assert as_expected(load_records("hf://datasets/someone/colours")) == as_expected(synth[:3])

    (snapshot / "2.png").unlink()
    (snapshot / "2.png").symlink_to(synth[2].image)  # out of the cache
    with pytest.raises(UserError, match=rf"metadata.jsonl:3: image .* is outside the dataset's root {repo} "):
        load_records("hf://datasets/someone/colours")


def test_dataset_objects_in_the_python_api(synth, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    columns = {"image": [r.image for r in synth], "text": [r.captions[0] for r in synth]}
    dataset = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    records = load_records(dataset)
    assert [record.captions for record in records] == [record.captions for record in synth]
    assert records[0].image_id == "data.parquet#0" and {record.split for record in records} == {"train"}
    assert load_records(dataset) == records  # exported once, read again
    splits = datasets.DatasetDict({"train": dataset.select(range(20)), "test": dataset.select(range(20, 24))})
    assert [record.split for record in load_records(splits)] == ["test"] * 4 + ["train"] * 20

    captioner = Captioner.from_pretrained(tiny_model_dir)
    expected = captioner([record.image for record in synth[:4]], max_new_tokens=4)
    assert captioner(list(dataset.select(range(4))["image"]), max_new_tokens=4) == expected  # PIL images
    cells = dataset.select(range(4)).cast_column("image", datasets.Image(decode=False))["image"]
    assert captioner(list(cells), max_new_tokens=4) == expected  # {bytes, path} dicts
    assert captioner(dataset.select(range(4))["image"], max_new_tokens=4) == expected  # the column itself
    assert captioner(dataset.select(range(4)), max_new_tokens=4) == expected  # its image column


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("layout", ["imagefolder-jsonl", "imagefolder-csv", "parquet"])
def test_prepare_train_evaluate(synth, tiny_components, tmp_path: Path, layout: str, one_thread) -> None:
    clip, gpt2 = tiny_components
    if layout == "parquet":
        data = write_parquet(synth, tmp_path / "dataset")
    else:
        metadata, caption = ("metadata.jsonl", "text") if layout.endswith("jsonl") else ("metadata.csv", "caption")
        data = write_imagefolder(synth, tmp_path / "dataset", metadata, caption)
    features, run, evaluation = tmp_path / "features", tmp_path / "run", tmp_path / "evaluation"
    assert main(["prepare", str(data), "--out", str(features), "--vision-encoder", str(clip), "--workers", "0"]) == 0
    assert FeatureStore(features).manifest.splits == {"train": 20, "val": 2, "test": 2}
    assert main(["train", str(features), "--decoder", str(gpt2), "--out", str(run), "--prefix-length", "4",
                 "--epochs", "1", "--batch-size", "8", "--val-images", "2"]) == 0  # fmt: skip
    assert main(["evaluate", "--model", str(run / "best"), "--data", str(data), "--out", str(evaluation),
                 "--workers", "0", "--metrics", "bleu,stats", "--max-new-tokens", "6"]) == 0  # fmt: skip
    results = json.loads((evaluation / "results.json").read_text())
    test_ids = {record.image_id for record in load_records(data) if record.split == "test"}
    assert {str(row["image_id"]) for row in results} == test_ids


# ------------------------------------------------------------------------------------ output
def test_parquet_output_loads_as_an_image_text_dataset(image_dependent_model_dir: Path, tmp_path: Path) -> None:
    images = []
    for name in list(COLOURS)[:5]:  # 16-pixel images of five colours, each captioned with its own
        images.append(tmp_path / f"{name}.png")
        Image.fromarray(colour_image(name, 16)).save(images[-1])
    expected = captions_one_by_one(Captioner.from_pretrained(image_dependent_model_dir), images, max_new_tokens=4)
    out_file, out_dir = tmp_path / "captions.parquet", tmp_path / "job"
    common = ["--model", str(image_dependent_model_dir), "--workers", "0", "--max-new-tokens", "4",
              "--format", "parquet", "--batch-size", "2"]  # fmt: skip
    assert main(["caption", *map(str, images), "--output", str(out_file), "--embed-images", *common]) == 0
    assert main(["caption", *map(str, images), "--output", f"{out_dir}/", "--embed-images", *common]) == 0
    for written in (out_file, out_dir / "captions.parquet"):
        loaded = datasets.load_dataset("parquet", data_files=str(written), split="train")
        assert loaded.column_names == ["image", "path", "caption", "captions"]
        assert isinstance(loaded.features["image"], datasets.Image)
        rows = loaded.cast_column("image", datasets.Image(decode=False))
        assert [row["image"]["bytes"] for row in rows] == [path.read_bytes() for path in images]
        assert [row["path"] for row in rows] == [str(path) for path in images]
        assert [row["captions"] for row in rows] == expected
        assert [row["caption"] for row in rows] == [captions[0] for captions in expected]
        assert loaded[0]["image"].size == (16, 16)  # decodes as a PIL image
    part = next((out_dir / "parts").glob("part-*.jsonl")).read_text()
    assert "bytes" not in part  # part files hold captions only


def test_caption_reads_a_parquet_dataset_and_embeds_its_images(
    synth, image_dependent_model_dir: Path, tmp_path: Path
) -> None:
    root = write_parquet(synth, tmp_path / "dataset")
    out = tmp_path / "captions.parquet"
    args = ["--model", str(image_dependent_model_dir), "--workers", "0", "--max-new-tokens", "4",
            "--format", "parquet", "--batch-size", "4"]  # fmt: skip
    assert main(["caption", str(root), "--output", str(out), "--embed-images", *args]) == 0
    loaded = datasets.load_dataset("parquet", data_files=str(out), split="train").cast_column(
        "image", datasets.Image(decode=False)
    )
    # the files in name order (test, train, validation), each in its row order
    records = [record for split in ("test", "train", "val") for record in synth if record.split == split]
    assert [row["path"] for row in loaded] == [
        f"{root / 'data' / HF_SPLITS[record.split]}-00000-of-00001.parquet#row={row}"
        for split in ("test", "train", "val")
        for row, record in enumerate(record for record in records if record.split == split)
    ]
    assert [row["image"]["bytes"] for row in loaded] == [read_image_bytes(record.image) for record in records]
    captioner = Captioner.from_pretrained(image_dependent_model_dir)
    expected = [captioner([record.image], max_new_tokens=4)[0] for record in records]
    assert len({tuple(captions) for captions in expected}) >= 4  # the colours give several different captions
    assert [row["captions"] for row in loaded] == expected


def test_embed_images_needs_parquet(tiny_model_dir: Path, example_images, tmp_path: Path, capsys) -> None:
    args = ["caption", str(example_images[0]), "--model", str(tiny_model_dir), "--embed-images"]
    assert main([*args, "--output", str(tmp_path / "out.jsonl"), "--format", "jsonl"]) == 2
    assert capsys.readouterr().err.strip() == "error: --embed-images needs --format parquet"


def test_caption_refuses_to_overwrite_its_parquet_input(synth, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    dataset = next((write_parquet(synth, tmp_path / "dataset") / "data").glob("test-*.parquet"))
    before = dataset.read_bytes()
    args = ["caption", str(dataset), "--model", str(tiny_model_dir), "--format", "parquet", "--output", str(dataset)]
    assert main(args) == 2
    assert "is also an input; writing it would destroy that input" in capsys.readouterr().err
    assert dataset.read_bytes() == before


def test_prepare_features_takes_a_dataset_dict(synth, tiny_components, tmp_path: Path, monkeypatch) -> None:
    from prefixcap.pipeline.prepare import prepare_features

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    columns = {"image": [r.image for r in synth], "caption": [r.captions[0] for r in synth]}
    dataset = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    splits = datasets.DatasetDict({"train": dataset.select(range(20)), "validation": dataset.select(range(20, 24))})
    manifest = prepare_features(splits, tmp_path / "features", vision_encoder=tiny_components[0], num_workers=0)
    assert manifest.splits == {"train": 20, "val": 4} and manifest.num_bad == 0
    assert Path(manifest.source).parent == tmp_path / "cache" / "prefixcap"


# ------------------------------------------------------------------------------------ hostile inputs
@pytest.mark.timeout(60)  # a FIFO used to block open() until a writer came
def test_parquet_path_cells_and_metadata_names_open_only_regular_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    dataset = path_parquet(tmp_path / "data.parquet", ["fifo.png", "zero.png"])
    with pytest.raises(ImageLoadError, match=r"data.parquet#row=0: .*fifo.png: not a regular file \(a FIFO\)$"):
        read_image_bytes(f"{dataset}#row=0")
    with pytest.raises(ImageLoadError, match=r"data.parquet#row=1: .*zero.png: not a regular file \(a character"):
        read_image_bytes(StoredImage(f"{dataset}#row=1", outside_root=True))  # (the link leads outside)

    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "fifo.png", "text": "a pipe"}) + "\n")
    (record,) = load_records(tmp_path, format="imagefolder")
    with pytest.raises(ImageLoadError, match=r"fifo.png: not a regular file \(a FIFO\)$"):
        read_image(record.image)


def test_an_absolute_file_name_is_a_record_not_a_traceback(tmp_path: Path) -> None:
    image = tmp_path / "elsewhere" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"not read here")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "metadata.jsonl").write_text(json.dumps({"file_name": str(image), "text": "x"}) + "\n")
    (record,) = load_records(tmp_path / "ds", allow_outside_root=True)
    assert (record.image, record.image_id) == (str(image), image.as_posix())


def test_a_damaged_parquet_file_is_one_line_for_caption(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")
    with pytest.raises(UserError, match=r"damaged.parquet: not a Parquet file \("):
        expand_inputs([str(damaged)])
    assert main(["caption", str(damaged), "--model", str(tiny_model_dir)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {damaged}: not a Parquet file (")


IMAGE_STRUCT = {"bytes": "binary", "path": "string"}


def zero_cells(sizes: list[int]):
    """An image column of `sizes`-byte cells of zeros, backed by memory that is never written (so
    it takes no resident memory), written zstd-compressed: a tiny file that is huge once read."""
    import numpy as np
    import pyarrow as pa

    data = pa.py_buffer(np.zeros(sum(sizes), np.uint8))
    offsets = pa.py_buffer(np.cumsum([0, *sizes], dtype=np.int32))
    cells = pa.Array.from_buffers(pa.binary(), len(sizes), [None, offsets, data])
    return pa.StructArray.from_arrays([cells, pa.nulls(len(sizes), pa.string())], names=list(IMAGE_STRUCT))


def amplifying_parquet(path: Path, case: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if case == "5M rows in one row group":
        rows = 5_000_000
        image = pa.nulls(rows, pa.struct([(name, getattr(pa, kind)()) for name, kind in IMAGE_STRUCT.items()]))
    else:
        image = zero_cells([300 * 2**20] if case == "one 300 MB cell" else [100 * 2**20] * 11)
        rows = len(image)
    table = pa.table({"image": image, "text": pa.array(["a caption"] * rows)})
    # (without dictionaries, so that the eleven equal cells are eleven cells)
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=1,
        row_group_size=rows,
        use_dictionary=["text"],
        write_statistics=False,
    )
    return path


AMPLIFYING = {  # case -> what the one line says
    "5M rows in one row group": r"row group 0 has 5,000,000 rows, over the [\d,]+-row limit",
    "one 300 MB cell": r"row group 0: column 'image' is [\d,]+ bytes uncompressed, over the [\d,]+-byte limit",
    "1.1 GB in one row group": r"row group 0: column 'image' is [\d,]+ bytes uncompressed, over the [\d,]+-byte limit",
}


@measures_peak_memory
@pytest.mark.parametrize("case", AMPLIFYING)
def test_parquet_amplification_is_one_line_in_bounded_memory(tmp_path: Path, case: str) -> None:
    """A few KB of Parquet can hold GBs of cells or millions of rows: the row list (caption), the
    records (prepare) and one row's image are each refused in one line, from the file's metadata."""
    dataset = amplifying_parquet(tmp_path / "data.parquet", case)
    assert dataset.stat().st_size < 2**20
    with peak_memory_growth() as growth:
        with pytest.raises(UserError, match=rf"^{dataset}: {AMPLIFYING[case]}"):
            expand_inputs([str(dataset)])
        with pytest.raises(UserError, match=rf"^{dataset}: {AMPLIFYING[case]}"):
            load_records(dataset)
        with pytest.raises(ImageLoadError, match=rf"^{dataset}#row=0: {dataset}: {AMPLIFYING[case]}"):
            read_image_bytes(f"{dataset}#row=0")
    assert growth[0] < 200 * 2**20, f"peak grew by {growth[0] / 2**20:.0f} MiB"


def test_a_parquet_cell_over_the_image_cap_is_refused(tmp_path: Path) -> None:
    """Cells are capped one by one too: here the row group's column (two cells) fits its limit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefixcap.inputs.images import MAX_IMAGE_BYTES

    table = pa.table({"image": zero_cells([MAX_IMAGE_BYTES + 1, 10]), "text": ["a", "b"]})
    pq.write_table(table, tmp_path / "data.parquet", compression="zstd", compression_level=1, write_statistics=False)
    with pytest.raises(ImageLoadError, match=rf"data.parquet#row=0: {MAX_IMAGE_BYTES + 1:,} bytes, over the"):
        read_image_bytes(f"{tmp_path / 'data.parquet'}#row=0")
    assert read_image_bytes(f"{tmp_path / 'data.parquet'}#row=1") == b"\0" * 10


@measures_peak_memory
def test_parquet_dictionaries_are_not_expanded_past_the_limit(tmp_path: Path) -> None:
    """Eleven rows sharing one 100 MB caption, stored once in a dictionary: small on disk and even
    uncompressed, 1.1 GB as Python strings. The shared image is read once, as stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    caption = pa.Array.from_buffers(pa.string(), 1, zero_cells([100 * 2**20]).field("bytes").buffers())
    text = pa.DictionaryArray.from_arrays(pa.array([0] * 11, pa.int32()), caption)
    image = pa.DictionaryArray.from_arrays(pa.array([0] * 11, pa.int32()), zero_cells([100 * 2**20]).field("bytes"))
    images = pa.StructArray.from_arrays([image, pa.nulls(11, pa.string())], names=list(IMAGE_STRUCT))
    table = pa.table({"image": images, "text": text})
    pq.write_table(table, tmp_path / "data.parquet", compression="zstd", compression_level=1, write_statistics=False)
    with peak_memory_growth() as growth:
        with pytest.raises(UserError, match=r"row group 0: column 'text' holds 1,153,433,600 bytes once expanded"):
            load_records(tmp_path / "data.parquet")
        for row in (0, 10):
            assert len(read_image_bytes(f"{tmp_path / 'data.parquet'}#row={row}")) == 100 * 2**20
    # a few copies of the one 100 MB value while it is decompressed and read; expanded, 11 of them
    assert growth[0] < 800 * 2**20, f"peak grew by {growth[0] / 2**20:.0f} MiB"


def test_hf_image_paths_stay_inside_the_dataset_root_unless_allowed(synth, tmp_path: Path) -> None:
    """imagefolder names and Parquet path cells: refused whole when reading records; a caption row
    that leads outside is that image's failure, and --allow-outside-root reads it."""
    outside = synth[0].image
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "metadata.jsonl").write_text(json.dumps({"file_name": "../../" + outside, "text": "x"}) + "\n")
    dataset = path_parquet(tmp_path / "pq" / "data.parquet", ["../" + Path(outside).name, outside])
    shutil.copy(outside, tmp_path)  # ../NAME: beside the Parquet file's folder, not in it
    for source, where in ((tmp_path / "ds", "metadata.jsonl:1"), (dataset, "data.parquet: row 0")):
        with pytest.raises(UserError, match=rf"{where}: image .* is outside the dataset's root .*--allow-outside-root"):
            load_records(source)
        assert len(load_records(source, allow_outside_root=True)) in (1, 2)

    (first, second), _ = expand_inputs([str(dataset)])
    for row in (first, second):
        with pytest.raises(ImageLoadError, match=rf"#row=\d: image .* is outside the dataset's root {dataset.parent} "):
            read_image_bytes(row)
    (first, second), _ = expand_inputs([str(dataset)], allow_outside_root=True)
    assert read_image_bytes(first) == read_image_bytes(second) == Path(outside).read_bytes()
    assert pickle.loads(pickle.dumps(first)).outside_root  # as DataLoader workers receive it


def test_the_outside_root_flag_reaches_every_command(
    synth, tiny_model_dir: Path, tiny_components, tmp_path: Path, capsys
):
    outside = synth[0].image
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"image": outside, "image_id": "x", "caption": "a caption", "split": "test"}) + "\n")
    dataset = path_parquet(tmp_path / "data.parquet", [outside])
    model, encoder = ["--model", str(tiny_model_dir)], ["--vision-encoder", str(tiny_components[0])]
    commands = {
        "prepare": ["prepare", str(jsonl), "--out", str(tmp_path / "features"), *encoder, "--workers", "0"],
        "evaluate": ["evaluate", *model, "--data", str(jsonl), "--metrics", "bleu", "--out", str(tmp_path / "eval")],
        "score": [
            "score",
            "--results",
            str(tmp_path / "results.json"),
            "--references",
            str(jsonl),
            "--metrics",
            "bleu",
        ],
        "caption": ["caption", str(dataset), *model, "--workers", "0", "--max-new-tokens", "4"],
    }
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": "x", "caption": "a caption"}]))
    for name, command in commands.items():
        capsys.readouterr()
        assert main(command) == (1 if name == "caption" else 2), name
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is outside the dataset's root" in errors[0], (name, errors)
        assert main([*command, "--allow-outside-root"]) == 0, (name, capsys.readouterr().err)


def test_embedded_images_keep_the_outside_root_opt_in_when_folder_parts_merge(
    synth, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A folder job with --embed-images reads each image again when it merges its parts: the
    --allow-outside-root choice must reach that read too."""
    import pyarrow.parquet as pq

    outside = synth[0].image
    dataset = path_parquet(tmp_path / "data.parquet", [outside])
    command = ["caption", str(dataset), "--model", str(tiny_model_dir), "--workers", "0", "--max-new-tokens", "3",
               "--output", f"{tmp_path / 'out'}/", "--format", "parquet", "--embed-images", "--allow-outside-root"]  # fmt: skip
    assert main(command) == 0
    (row,) = pq.read_table(tmp_path / "out" / "captions.parquet").to_pylist()
    assert row["image"]["bytes"] == Path(outside).read_bytes()
