"""Hugging Face datasets in and out: imagefolder trees, Parquet files written by `datasets`, hub
ids, `datasets.Dataset` objects, and Parquet output that `datasets.load_dataset` reads back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from prefixcap import Captioner
from prefixcap.cli import main
from prefixcap.data import CaptionRecord, load_records, read_image_bytes
from prefixcap.data.synth import make_synthetic_dataset
from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.expand import expand_inputs
from prefixcap.inputs.loader import read_image
from prefixcap.inputs.sources import StoredImage
from prefixcap.pipeline.features import FeatureStore

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
    """`data/SPLIT-00000-of-00001.parquet` files written by `datasets`, as on the hub; with `embed`
    the image structs hold the bytes, else only the paths."""
    for split, name in HF_SPLITS.items():
        rows = [record for record in records if record.split == split]
        images = [{"bytes": Path(r.image).read_bytes(), "path": Path(r.image).name} for r in rows] if embed else None
        columns = {"image": images or [r.image for r in rows], "text": [r.captions[0] for r in rows]}
        dataset = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
        dataset.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return root


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

    records = load_records(root)  # img and sentences are among the defaults
    assert all(record.captions[1] == "another" for record in records)
    with pytest.raises(UserError, match=r"no caption column 'nope' \(columns: img, sentences\)$"):
        load_records(root, caption_column="nope")

    unlabelled = tmp_path / "unlabelled.parquet"  # hub test splits often have no captions
    texts = [None if n % 2 else record.captions[0] for n, record in enumerate(synth)]
    datasets.Dataset.from_dict({"image": [r.image for r in synth], "text": texts}).to_parquet(str(unlabelled))
    assert len(load_records(unlabelled)) == len(synth) // 2

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
def test_parquet_output_loads_as_an_image_text_dataset(synth, tiny_model_dir: Path, tmp_path: Path) -> None:
    images = sorted(Path(synth[0].image).parent.glob("*.png"))[:5]
    out_file, out_dir = tmp_path / "captions.parquet", tmp_path / "job"
    common = ["--model", str(tiny_model_dir), "--workers", "0", "--max-new-tokens", "4", "--format", "parquet"]
    assert main(["caption", *map(str, images), "--output", str(out_file), "--embed-images", *common]) == 0
    assert main(["caption", *map(str, images), "--output", f"{out_dir}/", "--embed-images", *common]) == 0
    for written in (out_file, out_dir / "captions.parquet"):
        loaded = datasets.load_dataset("parquet", data_files=str(written), split="train")
        assert loaded.column_names == ["image", "path", "caption", "captions"]
        assert isinstance(loaded.features["image"], datasets.Image)
        rows = loaded.cast_column("image", datasets.Image(decode=False))
        assert [row["image"]["bytes"] for row in rows] == [path.read_bytes() for path in images]
        assert [row["path"] for row in rows] == [str(path) for path in images]
        assert all(row["caption"] == row["captions"][0] and row["caption"] for row in rows)
        assert loaded[0]["image"].size == (16, 16)  # decodes as a PIL image
    part = next((out_dir / "parts").glob("part-*.jsonl")).read_text()
    assert "bytes" not in part  # part files hold captions only


def test_caption_reads_a_parquet_dataset_and_embeds_its_images(synth, tiny_model_dir: Path, tmp_path: Path) -> None:
    root = write_parquet(synth, tmp_path / "dataset")
    out = tmp_path / "captions.parquet"
    args = ["--model", str(tiny_model_dir), "--workers", "0", "--max-new-tokens", "4", "--format", "parquet"]
    assert main(["caption", str(root), "--output", str(out), "--embed-images", *args]) == 0
    loaded = datasets.load_dataset("parquet", data_files=str(out), split="train").cast_column(
        "image", datasets.Image(decode=False)
    )
    assert len(loaded) == len(synth)
    assert loaded[0]["path"].endswith("test-00000-of-00001.parquet#row=0")
    assert {row["image"]["bytes"] for row in loaded} == set(as_expected(synth))


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
def path_parquet(file: Path, paths: list[str]) -> Path:
    """A Parquet dataset whose image structs hold only paths, as `datasets` writes unembedded images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.array(
        [{"bytes": None, "path": path} for path in paths], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    pq.write_table(pa.table({"image": image, "text": [f"caption {n}" for n in range(len(paths))]}), file)
    return file


@pytest.mark.timeout(60)  # a FIFO used to block open() until a writer came
def test_parquet_path_cells_and_metadata_names_open_only_regular_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    dataset = path_parquet(tmp_path / "data.parquet", ["fifo.png", "zero.png"])
    with pytest.raises(ImageLoadError, match=r"data.parquet#row=0: .*fifo.png: not a regular file \(a FIFO\)$"):
        read_image_bytes(f"{dataset}#row=0")
    with pytest.raises(ImageLoadError, match=r"data.parquet#row=1: .*zero.png: not a regular file \(a character"):
        read_image_bytes(f"{dataset}#row=1")

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
    (record,) = load_records(tmp_path / "ds")
    assert (record.image, record.image_id) == (str(image), image.as_posix())


def test_a_damaged_parquet_file_is_one_line_for_caption(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")
    with pytest.raises(UserError, match=r"damaged.parquet: not a Parquet file \("):
        expand_inputs([str(damaged)])
    assert main(["caption", str(damaged), "--model", str(tiny_model_dir)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {damaged}: not a Parquet file (")
