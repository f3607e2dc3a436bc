"""Feature stores, training runs, evaluation and scoring with bad inputs: damaged stores and
training states, over-long captions, resuming on other data, one metric's failure, offline SPICE,
range-checked options, and commands that never write into folders that are not theirs."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixcap.cli import build_parser, main
from prefixcap.data import load_records
from prefixcap.data.synth import make_synthetic_dataset
from prefixcap.errors import UserError
from prefixcap.evaluation import coco_metrics
from prefixcap.pipeline.features import MANIFEST, FeatureStore, shard_path
from prefixcap.pipeline.prepare import prepare_features
from prefixcap.training import TrainConfig, resolve_config
from prefixcap.training.config import BOUNDS, FIELDS, field_kind
from prefixcap.training.data import CaptionTargets
from prefixcap.training.state import JSON_FILE, STATE_DIR, TENSORS_FILE, load_training_state, save_training_state
from prefixcap.training.trainer import Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """captions.jsonl of 30 synthetic images (24 train, 3 val, 3 test)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("hardening") / "data", num_images=30, image_size=16)


@pytest.fixture(scope="module")
def store(dataset: Path, tiny_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature store of `dataset` in three shards of 10 images."""
    out = tmp_path_factory.mktemp("hardening-store") / "features"
    prepare_features(dataset, out, vision_encoder=tiny_components[0], shard_size=10, num_workers=0)
    return out


def run_config(features: Path, out: Path, decoder: Path, **options) -> TrainConfig:
    values = {"features": str(features), "out": str(out), "decoder": str(decoder), "prefix_length": 4,
              "epochs": 1, "batch_size": 8, "lr": 1e-3, "val_images": 2, "seed": 0, **options}  # fmt: skip
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def finished_run(store: Path, tiny_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("hardening-run") / "run"
    Trainer(run_config(store, run, tiny_components[1])).fit()
    return run


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def one_error(capsys: pytest.CaptureFixture) -> str:
    """The command's single `error:` line (and no traceback)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------------- damaged feature stores
def truncate_embeddings(store: Path) -> str:
    path = shard_path(store, 1, ".safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return r"000001\.safetensors: unreadable"


def break_index_line(store: Path) -> str:
    path = shard_path(store, 1, ".jsonl")
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][:25] + "\n"
    path.write_text("".join(lines))
    return r"000001\.jsonl:3: not a feature store entry"


def cut_index_short(store: Path) -> str:
    path = shard_path(store, 1, ".jsonl")
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:5]))
    return r"000001\.jsonl: 5 records, but store\.json says the shard holds 10"


def drop_shard_from_manifest(store: Path) -> str:
    manifest = json.loads((store / MANIFEST).read_text())
    manifest["num_shards"] = 2
    (store / MANIFEST).write_text(json.dumps(manifest))
    return r"store\.json: its shard and image counts disagree"


def move_images_between_splits(store: Path) -> str:
    manifest = json.loads((store / MANIFEST).read_text())
    manifest["splits"] = {"test": 3, "train": 27}
    (store / MANIFEST).write_text(json.dumps(manifest))
    return r"store\.json: lists 30 images \(\{'test': 3, 'train': 27\}\), but the shards hold 30"


def edit_index_entry(store: Path) -> str:
    path = shard_path(store, 0, ".jsonl")
    path.write_text(path.read_text().replace("shape", "thing", 1))
    return r"000000\.jsonl: changed since `prefixcap prepare` wrote it"


DAMAGES = [
    truncate_embeddings, break_index_line, cut_index_short, drop_shard_from_manifest, move_images_between_splits,
    edit_index_entry,
]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__)
def test_damaged_store_is_one_line_error_naming_the_file(
    damage, store: Path, tiny_components, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    features = copy(store, tmp_path)
    message = damage(features)

    with pytest.raises(UserError, match=message):
        FeatureStore(features).embeddings()
    args = ["train", str(features), "--out", str(tmp_path / "run"), "--decoder", str(tiny_components[1])]
    assert main(args) == 2
    error = one_error(capsys)
    assert str(features) in error and "rerun `prefixcap prepare`" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", [truncate_embeddings, break_index_line, edit_index_entry], ids=lambda d: d.__name__)
def test_prepare_rerun_encodes_a_damaged_shard_again(
    damage, store: Path, dataset: Path, tiny_components, tmp_path: Path
) -> None:
    features = copy(store, tmp_path)
    damage(features)

    prepare_features(dataset, features, vision_encoder=tiny_components[0], shard_size=10, num_workers=0)

    repaired, original = FeatureStore(features), FeatureStore(store)
    assert repaired.records() == original.records() and torch.equal(repaired.embeddings(), original.embeddings())


# ---------------------------------------------------------------------- over-long captions
def test_targets_never_exceed_the_decoder_positions() -> None:
    token_ids = [[5] * 3, [5] * 4, [5] * 100_000]
    targets = CaptionTargets.from_token_ids(token_ids, np.arange(3), torch.zeros(3, 2), 0, 0, max_tokens=None, limit=20)
    assert targets.max_tokens == 20 and targets.num_cut == 1
    asked = CaptionTargets.from_token_ids(token_ids, np.arange(3), torch.zeros(3, 2), 0, 0, max_tokens=500, limit=20)
    assert asked.max_tokens == 20 and asked.num_cut == 1


@pytest.mark.parametrize("asked", [None, 5000])
def test_huge_caption_or_length_is_capped_and_reported(
    asked: int | None, dataset: Path, tiny_components, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lines = [json.loads(line) for line in dataset.read_text().splitlines()]
    next(line for line in lines if line["split"] == "train")["caption"] = "a red shape " * 9000  # 100k characters
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prepare_features(  # the images stay where they are
        tmp_path / "long.jsonl", tmp_path / "features", vision_encoder=tiny_components[0], num_workers=0,
        images_root=dataset.parent,
    )  # fmt: skip

    features = tmp_path / "features"
    progress = Trainer(run_config(features, tmp_path / "run", tiny_components[1], max_caption_tokens=asked)).fit()

    limit = 96 - 4  # the tiny GPT-2's positions minus the prefix
    assert load_training_state(tmp_path / "run" / "last" / STATE_DIR).config["max_caption_tokens"] == limit
    assert progress.epoch == 1
    err = capsys.readouterr().err
    assert f"max caption length {limit} tokens incl. EOS, 1 of 24 training captions" in err
    assert (f"--max-caption-tokens {asked} is capped to {limit}" in err) == (asked is not None)


# ---------------------------------------------------------------------- damaged training state
def _write(name: str, data: bytes):
    return lambda state: (state / name).write_bytes(data)


def _edit(change):
    def apply(state: Path) -> None:
        document = json.loads((state / JSON_FILE).read_text())
        change(document)
        (state / JSON_FILE).write_text(json.dumps(document))

    return apply


STATE_DAMAGES = {  # what to damage, and the file the error must name
    "truncated tensors": (TENSORS_FILE, _write(TENSORS_FILE, b"\x10\x00")),
    "not json": (JSON_FILE, _write(JSON_FILE, b'{"optimizer": ')),
    "no optimizer": (JSON_FILE, _edit(lambda d: d.pop("optimizer"))),
    "dangling tensor": (JSON_FILE, _edit(lambda d: d["rng"][0].update(torch={"__tensor__": "?"}))),
    "progress incomplete": (STATE_DIR, _edit(lambda d: d["progress"].pop("epoch_step"))),
    "optimizer of another model": (STATE_DIR, _edit(lambda d: d["optimizer"]["param_groups"].pop())),
    "config unknown option": (JSON_FILE, _edit(lambda d: d["config"].update(colour="red"))),
    "config bad value": (JSON_FILE, _edit(lambda d: d["config"].update(epochs=-1))),
}


@pytest.mark.parametrize("damage", STATE_DAMAGES, ids=str)
def test_damaged_training_state_is_one_line_error_naming_the_file(
    damage: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = copy(finished_run, tmp_path)
    name, apply = STATE_DAMAGES[damage]
    apply(run / "last" / STATE_DIR)

    assert main(["train", "--out", str(run), "--resume"]) == 2
    error = one_error(capsys)
    assert f"{run / 'last' / STATE_DIR}" in error and name in error and "damaged training state" in error


def test_training_state_is_written_atomically(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefixcap.training import state as state_module

    directory = copy(finished_run, tmp_path) / "last" / STATE_DIR
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    saved = load_training_state(directory)

    def crash(tensors, path, *args, **kwargs) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(state_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(directory, saved)
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before  # old state intact, no debris


# ---------------------------------------------------------------------- resuming on other features
def test_resume_refuses_another_feature_store_but_follows_a_moved_one(
    finished_run: Path, store: Path, tiny_components, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = make_synthetic_dataset(tmp_path / "other", num_images=20, image_size=16, seed=5)
    prepare_features(other, tmp_path / "other-features", vision_encoder=tiny_components[0], num_workers=0)
    run = copy(finished_run, tmp_path)

    assert main(["train", str(tmp_path / "other-features"), "--out", str(run), "--resume", "--epochs", "1"]) == 2
    assert "is not the feature store the resumed run trains on" in one_error(capsys)

    moved = Path(shutil.copytree(store, tmp_path / "moved"))
    assert main(["train", str(moved), "--out", str(run), "--resume", "--epochs", "1"]) == 0


# ---------------------------------------------------------------------- metric failures, offline SPICE
@pytest.fixture
def clip_without_pad(tiny_components, tmp_path: Path) -> Path:
    """The tiny CLIP, but its tokenizer has no pad token, so batching its texts fails."""
    clip = Path(shutil.copytree(tiny_components[0], tmp_path / "clip-no-pad"))
    settings = json.loads((clip / "tokenizer_config.json").read_text())
    (clip / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": None}))
    return clip


def test_evaluate_survives_a_failing_metric_and_keeps_the_captions(
    tiny_model_dir: Path,
    dataset: Path,
    clip_without_pad: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setattr(coco_metrics.shutil, "which", lambda name: None)  # no Java: quick, simple tokenization
    test_ids = {record.image_id for record in load_records(dataset) if record.split == "test"}
    common = ["evaluate", "--model", str(tiny_model_dir), "--data", str(dataset), "--workers", "0",
              "--max-new-tokens", "5", "--clip-model", str(clip_without_pad)]  # fmt: skip

    assert main([*common, "--out", str(tmp_path / "all")]) == 0
    summary = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert "padding token" in summary["skipped"]["CLIPScore"] and "CIDEr (simple tokenization)" in summary["metrics"]
    assert any(line.startswith("note: CLIPScore skipped:") for line in capsys.readouterr().err.splitlines())

    assert main([*common, "--out", str(tmp_path / "named"), "--metrics", "clipscore"]) == 2
    assert "CLIPScore failed (ValueError: Asking to pad" in one_error(capsys)
    results = json.loads((tmp_path / "named" / "results.json").read_text())
    assert {str(row["image_id"]) for row in results} == test_ids  # the captions are kept


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")
def test_score_offline_never_downloads_corenlp(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from pycocoevalcap.spice import get_stanford_models, spice

    if Path(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB, f"{get_stanford_models.JAR}.jar").exists():
        pytest.skip("CoreNLP is installed, so SPICE needs no download")

    def download() -> None:
        raise AssertionError("downloaded CoreNLP while offline")

    monkeypatch.setattr(spice, "get_stanford_models", download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    test = [record for record in load_records(dataset) if record.split == "test"]
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": r.image_id, "caption": r.captions[0]} for r in test]))

    score = ["score", "--results", str(results), "--references", str(dataset)]
    assert main(score) == 0  # SPICE not named: skipped with a note
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["skipped"]["SPICE"].startswith("offline") and "BLEU-4" in summary["metrics"]
    notes = [line for line in capsys.readouterr().err.splitlines() if "SPICE" in line]
    assert len(notes) == 1 and notes[0].startswith("note: SPICE skipped: offline")
    assert main([*score, "--metrics", "bleu,spice"]) == 2  # named: an error
    assert one_error(capsys).startswith("error: SPICE cannot run: offline")


# ---------------------------------------------------------------------- numeric options
def numeric_options(command: str) -> dict[str, argparse.Action]:
    """The options of `command` that parse numbers (any type but str and Path)."""
    parser = build_parser()
    subcommand = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {action.option_strings[0]: action for action in subcommand._actions if action.type not in (None, str, Path)}


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "score"])
def test_every_numeric_option_is_range_checked(command: str) -> None:
    options = numeric_options(command)
    assert options
    for action in options.values():
        for text in ("nan", "inf", "-inf", "-1e999"):
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(text)


def test_every_numeric_train_option_has_bounds() -> None:
    numeric = {name for name in FIELDS if field_kind(name) in ("int", "float")}
    assert numeric == set(BOUNDS)
    flags = numeric_options("train")
    assert {flag.removeprefix("--").replace("-", "_") for flag in flags} == numeric


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--seed", str(2**32), "seed must be in [0, 4294967295], got 4294967296"),
        ("--lr", "inf", "must be a finite number"),
        ("--weight-decay", "nan", "must be a finite number"),
    ],
)
def test_train_refuses_out_of_range_options(
    flag: str, value: str, message: str, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(store), "--out", str(tmp_path / "run"), flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("text", ["lr: .inf\n", "warmup: .nan\n", "seed: 99999999999\n"])
def test_config_files_are_range_checked_too(text: str, tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(UserError, match=r"must be a finite number|must be in \[0, 4294967295\]"):
        resolve_config({}, tmp_path / "run.yaml")


# ---------------------------------------------------------------------- folders that are not ours
def test_prepare_refuses_a_folder_that_is_not_a_feature_store(
    dataset: Path, tiny_components, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    args = ["prepare", str(dataset), "--out", str(tmp_path / "mine"), "--vision-encoder", str(tiny_components[0]),
            "--workers", "0"]  # fmt: skip

    assert main(args) == 2
    assert "is not a prefixcap feature store" in one_error(capsys)
    assert main([*args, "--overwrite"]) == 2
    assert sorted(path.name for path in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_prepare_replaces_another_store_only_with_overwrite(
    store: Path, tiny_components, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    features = copy(store, tmp_path)
    other = make_synthetic_dataset(tmp_path / "other", num_images=12, image_size=16, seed=7)
    args = ["prepare", str(other), "--out", str(features), "--vision-encoder", str(tiny_components[0]),
            "--workers", "0"]  # fmt: skip

    assert main(args) == 2
    assert "already holds a prefixcap feature store; pass --overwrite" in one_error(capsys)
    assert FeatureStore(features).records() == FeatureStore(store).records()  # untouched
    assert main([*args, "--overwrite"]) == 0
    assert FeatureStore(features).records() == load_records(other)
    assert sorted(path.name for path in (features / "shards").iterdir()) == ["000000.jsonl", "000000.safetensors"]


def test_train_refuses_a_folder_that_is_not_a_run(
    store: Path, tiny_components, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")

    for extra in ([], ["--overwrite"]):
        args = ["train", str(store), "--out", str(tmp_path / "mine"), "--decoder", str(tiny_components[1]), *extra]
        assert main(args) == 2
        assert "is not a prefixcap training run" in one_error(capsys)
    assert sorted(path.name for path in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_train_overwrite_starts_an_earlier_run_afresh(
    finished_run: Path, store: Path, tiny_components, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = copy(finished_run, tmp_path)
    events = sorted(path.name for path in (run / "tensorboard").iterdir())
    args = ["train", str(store), "--out", str(run), "--decoder", str(tiny_components[1]), "--prefix-length", "4",
            "--epochs", "1", "--batch-size", "8", "--val-images", "2", "--seed", "1"]  # fmt: skip

    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "pass one of them" in one_error(capsys)
    assert main(args) == 2
    assert "already holds a run; pass --resume to continue it, --overwrite to start it afresh" in one_error(capsys)
    assert main([*args, "--overwrite"]) == 0

    assert load_training_state(run / "last" / STATE_DIR).config["seed"] == 1
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # the header and the new run's epoch
    assert not set(events) & {path.name for path in (run / "tensorboard").iterdir()}  # the old events are gone
