"""`prefixcap label`: a local VLM teacher, the dataset formats it writes (read back by `prepare`'s
reader), resuming, crash safety, prompt templates and dry runs."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from prefixcap.cli import main
from prefixcap.data import load_records
from prefixcap.errors import UserError
from prefixcap.inputs.expand import expand_inputs
from prefixcap.labeling import LabelPlan, PromptTemplate, open_dataset, run_label_job
from prefixcap.labeling.outputs import PENDING_FILE
from prefixcap.labeling.teachers import Failure, LabelItem
from tests.helpers_label import build_tiny_vlm, save_images

NAMES = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "llava")


def hf_label(*args: str | Path) -> int:
    return main(["label", *map(str, args), "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu"])


def captions_by_name(dataset: Path) -> dict[str, tuple[str, ...]]:
    """{image name: captions} of a dataset as `prepare` reads it. Parquet records name their
    images by row (`train-00000.parquet#row=3`): the rows' `path` column tells which image it is."""
    records = load_records(dataset)
    if not dataset.is_dir() or not list(dataset.glob("*.parquet")):
        return {Path(record.image).stem: record.captions for record in records}
    import pyarrow.parquet as pq

    paths = {f"{part.name}#row={row}": path for part in sorted(dataset.glob("*.parquet"))
             for row, path in enumerate(pq.read_table(part)["path"].to_pylist())}  # fmt: skip
    return {Path(paths[Path(record.image).name]).stem: record.captions for record in records}


def test_a_local_vlm_labels_a_folder_a_rerun_skips_labelled_images_and_the_dataset_trains(
    tmp_path, tiny_vlm, tiny_components, capsys, one_thread
):
    images = tmp_path / "images"
    save_images(images, NAMES[:3])
    save_images(images / "more", NAMES[3:])
    # existing captions of different lengths make prompts of different lengths, padded in a batch
    (images / "ant.txt").write_text("a red shape on a blue background")
    (images / "more" / "dog.txt").write_text("photo of a dog")
    labels = tmp_path / "labels.jsonl"
    prompt = ["--prompt", "describe: {existing}"]
    assert hf_label(images, "--teacher", f"hf:{tiny_vlm}", "--out", labels, "--batch-size", "3", *prompt) == 0
    batched = captions_by_name(labels)
    assert sorted(batched) == NAMES and all(captions[0] for captions in batched.values())
    assert len(set(batched.values())) > 1  # precondition: the teacher tells these images apart
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert {row["teacher"] for row in rows} == {f"hf:{tiny_vlm}"}
    assert {row["instruction"] for row in rows} >= {"describe: a red shape on a blue background", "describe:"}

    # each label is the one the teacher gives that image alone: batching pads and pairs captions right
    alone = tmp_path / "alone.jsonl"
    assert hf_label(images, "--teacher", f"hf:{tiny_vlm}", "--out", alone, "--batch-size", "1", *prompt) == 0
    assert captions_by_name(alone) == batched

    # a rerun labels only the new image and leaves the labelled ones as they were
    before = labels.read_bytes()
    save_images(images, ["fox"], colour=lambda _: (10, 200, 30))
    capsys.readouterr()
    assert hf_label(images, "--teacher", f"hf:{tiny_vlm}", "--out", labels, *prompt) == 0
    assert "1 labelled, 5 skipped" in capsys.readouterr().err
    assert labels.read_bytes().startswith(before)
    assert sorted(captions_by_name(labels)) == sorted([*NAMES, "fox"])
    # a rerun of a finished dataset loads no model (this one does not exist)
    assert hf_label(images, "--teacher", f"hf:{tmp_path / 'no-model'}", "--out", labels) == 0
    assert "0 labelled, 6 skipped (labelled before)" in capsys.readouterr().err

    # `prepare` and `train` take the labels as they are
    clip, gpt2 = tiny_components
    features, run = tmp_path / "features", tmp_path / "run"
    assert main(["prepare", str(labels), "--out", str(features), "--vision-encoder", str(clip), "--workers", "0"]) == 0
    assert main(["train", str(features), "--decoder", str(gpt2), "--out", str(run), "--prefix-length", "2",
                 "--epochs", "1", "--batch-size", "4"]) == 0  # fmt: skip
    assert (run / "last" / "config.json").is_file()


class StubTeacher:
    """Captions each image by its name; can stop the run (as Ctrl-C does) after `stop_after` labels."""

    description = "stub:teacher"

    def __init__(self, stop_after: int | None = None, fail: Iterable[str] = ()):
        self.stop_after, self.fail = stop_after, set(fail)
        self.seen: list[str] = []

    def label(self, items: Iterable[LabelItem]) -> Iterator[tuple[LabelItem, str | Failure]]:
        for item in items:
            if self.stop_after is not None and len(self.seen) == self.stop_after:
                raise KeyboardInterrupt
            self.seen.append(item.image)
            item.load()
            name = Path(item.image).stem
            yield item, Failure("refused") if name in self.fail else f"caption of {name}"


def stub_run(fmt: str, out: Path | None, paths: list[Path], teacher: StubTeacher, split: str | None = None, **plan):
    sources, _ = expand_inputs([str(path) for path in paths])
    dataset = open_dataset(
        fmt, None if out is None else str(out), split=split, paths=[str(p) for p in paths], sources=sources
    )
    return run_label_job(
        LabelPlan(sources, dataset.done, PromptTemplate.parse(None), **plan), teacher, dataset
    ), dataset


@pytest.mark.parametrize(
    ("fmt", "out", "read_as"),
    [
        ("jsonl", "labels.jsonl", "labels.jsonl"),
        ("imagefolder", "images", "images"),
        ("parquet", "parquet", "parquet"),
        ("sidecar", None, "images"),
        ("sidecar", "captions", None),
    ],
)
def test_every_format_is_read_back_by_prepare_and_resumes(tmp_path, fmt, out, read_as):
    images = tmp_path / "images"
    save_images(images, NAMES)
    out_path = None if out is None else tmp_path / out
    teacher = StubTeacher(fail=["eel"])
    summary, dataset = stub_run(fmt, out_path, [images], teacher)
    assert (summary.labelled, len(summary.failures)) == (4, 1)
    expected = {name: (f"caption of {name}",) for name in NAMES if name != "eel"}
    if read_as is not None:
        assert captions_by_name(tmp_path / read_as) == expected
    else:  # sidecar files mirrored under OUT: one .txt per image
        assert {p.stem: (p.read_text().strip(),) for p in out_path.rglob("*.txt")} == expected
    if dataset.failures_path is not None:
        (failure,) = [json.loads(line) for line in dataset.failures_path.read_text().splitlines()]
        assert failure["error"] == "refused" and Path(failure["image"]).stem == "eel"
    # a rerun asks the teacher only about the image that failed, and loses or repeats nothing
    again = StubTeacher()
    summary, _ = stub_run(fmt, out_path, [images], again)
    assert [Path(image).stem for image in again.seen] == ["eel"] and summary.skipped == 4
    if read_as is not None:
        assert captions_by_name(tmp_path / read_as) == {name: (f"caption of {name}",) for name in NAMES}


def test_split_is_written_where_the_format_keeps_it(tmp_path):
    images = tmp_path / "images"
    save_images(images, NAMES[:2])
    stub_run("jsonl", tmp_path / "labels.jsonl", [images], StubTeacher(), split="test")
    stub_run("parquet", tmp_path / "parquet", [images], StubTeacher(), split="val")
    assert {record.split for record in load_records(tmp_path / "labels.jsonl")} == {"test"}
    assert {record.split for record in load_records(tmp_path / "parquet")} == {"val"}
    assert [path.name for path in (tmp_path / "parquet").glob("*.parquet")] == ["val-00000.parquet"]


def test_an_interrupted_run_keeps_every_finished_label_and_a_torn_last_line_is_cut(tmp_path, capsys):
    images = tmp_path / "images"
    save_images(images, NAMES)
    labels = tmp_path / "labels.jsonl"
    with pytest.raises(KeyboardInterrupt):
        stub_run("jsonl", labels, [images], StubTeacher(stop_after=3))
    assert len(load_records(labels)) == 3
    with open(labels, "a") as file:  # what a kill in the middle of a write leaves
        file.write('{"image": "images/dog.png", "capt')
    stub_run("jsonl", labels, [images], StubTeacher())
    assert "cut off a partial last line" in capsys.readouterr().err
    assert captions_by_name(labels) == {name: (f"caption of {name}",) for name in NAMES}
    assert len(labels.read_text().splitlines()) == len(NAMES)


def test_parquet_labels_wait_in_a_journal_and_a_crash_between_part_and_journal_repeats_nothing(tmp_path, monkeypatch):
    from prefixcap.labeling import outputs

    images = tmp_path / "images"
    save_images(images, NAMES)
    out = tmp_path / "parquet"
    monkeypatch.setattr(outputs, "PART_SIZE", 2)
    with pytest.raises(KeyboardInterrupt):
        stub_run("parquet", out, [images], StubTeacher(stop_after=3))
    # two labels made a part; the third was in the journal, and became a part when the run stopped
    assert sorted(p.name for p in out.glob("*.parquet")) == ["train-00000.parquet", "train-00001.parquet"]
    assert not (out / PENDING_FILE).read_text()
    stub_run("parquet", out, [images], StubTeacher())
    # what a kill between a part's rename and the journal's truncation leaves: labels in both
    ant = outputs.image_key(str(images / "ant.png"))
    (out / PENDING_FILE).write_text(json.dumps({"image": ant, "caption": "caption of ant", "teacher": "stub"}) + "\n")
    again = StubTeacher()
    stub_run("parquet", out, [images], again)
    assert again.seen == [] and not (out / PENDING_FILE).read_text()
    captions = sorted(record.captions[0] for record in load_records(out))
    assert captions == sorted(f"caption of {name}" for name in NAMES)  # each image once


def test_refuses_to_add_to_files_it_did_not_write(tmp_path):
    images = tmp_path / "images"
    save_images(images, NAMES[:2])
    theirs = tmp_path / "captions.jsonl"
    theirs.write_text('{"image": "images/ant.png", "caption": "mine"}\n')
    with pytest.raises(UserError, match="not a record `prefixcap label` wrote"):
        stub_run("jsonl", theirs, [images], StubTeacher())
    assert theirs.read_text() == '{"image": "images/ant.png", "caption": "mine"}\n'
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="did not write"):
        stub_run("parquet", tmp_path / "folder", [images], StubTeacher())
    with pytest.raises(UserError, match="is not an image file inside"):
        stub_run("imagefolder", tmp_path / "folder", [images], StubTeacher())


def test_prompt_templates_fill_name_folder_and_the_existing_caption(tmp_path):
    (image,) = save_images(tmp_path / "dogs", ["rex"])
    (tmp_path / "dogs" / "rex.txt").write_text("a dog,\n  on grass\n")
    template = PromptTemplate.parse("Improve '{existing}' for {name} in {folder} {{literal}}")
    assert template.render(str(image), is_file=True) == "Improve 'a dog, on grass' for rex in dogs {literal}"
    assert PromptTemplate.parse("{existing}").render("shard.tar#key.jpg", is_file=False) == ""
    assert PromptTemplate.parse("{name}").render("data/train.parquet#row=3", is_file=False) == "row=3"
    assert PromptTemplate.parse("tags").text.startswith("List tags")
    for bad in ("{path}", "{name!r}", "{name:>9}", "{name.__class__}", "{"):
        with pytest.raises(UserError):
            PromptTemplate.parse(bad)


def test_a_dry_run_shows_the_request_and_an_estimate_and_sends_and_writes_nothing(tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    save_images(images, NAMES[:3])
    monkeypatch.setenv("LABEL_KEY", "sk-very-secret-key")
    out = tmp_path / "labels.jsonl"
    closed_port = "http://127.0.0.1:9/v1#big-vlm"  # nothing listens: a request would fail
    assert main(["label", str(images), "--teacher", f"openai:{closed_port}", "--out", str(out), "--api-key-env",
                 "LABEL_KEY", "--prompt", "Describe {name}.", "--dry-run"]) == 0  # fmt: skip
    printed = capsys.readouterr()
    assert f"would label {images / 'ant.png'}: Describe ant." in printed.out
    assert '"model": "big-vlm"' in printed.out and "Authorization: Bearer $LABEL_KEY" in printed.out
    assert "bytes of base64 image data>" in printed.out and "estimate: 3 requests" in printed.out
    assert "sk-very-secret-key" not in printed.out + printed.err
    assert not out.exists() and not list(tmp_path.glob("*.failures.jsonl"))


def test_options_of_the_other_kind_of_teacher_and_bad_specs_are_one_line_errors(tmp_path, capsys):
    save_images(tmp_path, ["ant"])
    assert main(["label", str(tmp_path), "--teacher", "hf:x", "--out", "o.jsonl", "--concurrency", "2"]) == 2
    assert "--concurrency applies to openai: teachers, not hf:" in capsys.readouterr().err
    assert main(["label", str(tmp_path), "--teacher", "vllm:x", "--out", "o.jsonl"]) == 2
    assert "expected KIND:TARGET" in capsys.readouterr().err
    assert (
        main(["label", str(tmp_path), "--teacher", "hf:" + str(tmp_path / "none"), "--out", str(tmp_path / "o.jsonl")])
        == 2
    )
    assert "cannot load the teacher" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.jsonl")
