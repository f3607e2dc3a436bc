"""`prefixcap evaluate`: caption a split (from a feature store or from images), then score it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefixcap.cli import main
from prefixcap.data import load_records
from prefixcap.evaluation import results_json


def read_json(path: Path):
    return json.loads(path.read_text())


def cider_of(summary: dict) -> float:
    suffix = "" if summary["settings"]["tokenization"] == "ptb" else " (simple tokenization)"
    return summary["metrics"]["CIDEr" + suffix]


def test_results_json_uses_integer_ids_where_coco_does() -> None:
    rows = results_json({"391895": "a man", "0012": "a dog", "images/a.png": "a cat"})
    assert rows == [
        {"image_id": 391895, "caption": "a man"},
        {"image_id": "0012", "caption": "a dog"},
        {"image_id": "images/a.png", "caption": "a cat"},
    ]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prefixcap.data.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("evaluate-data"), num_images=240, seed=0)


@pytest.fixture(scope="module")
def features(synthetic: Path, tiny_components: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate-features") / "store"
    assert (
        main(
            [
                "prepare",
                str(synthetic),
                "--out",
                str(out),
                "--vision-encoder",
                str(tiny_components[0]),
                "--workers",
                "0",
            ]
        )
        == 0
    )
    return out


def test_captions_from_images_equal_the_captioners(tiny_model_dir: Path, synthetic: Path) -> None:
    """Evaluation's image path feeds the loader's uint8 pixels to `generate`, which normalises them
    on the device exactly as `Captioner` does."""
    from prefixcap import Captioner
    from prefixcap.evaluation.generate import caption_records

    records = load_records(synthetic)[:6]
    captioner = Captioner.from_pretrained(tiny_model_dir)
    captions, failures = caption_records(captioner, records, batch_size=4, workers=0, max_new_tokens=8)
    expected = captioner([record.image for record in records], max_new_tokens=8)
    assert not failures and [captions[record.image_id] for record in records] == [texts[0] for texts in expected]


def test_evaluate_refuses_bad_options(
    tiny_model_dir: Path, synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(synthetic), "--num-captions", "2"]) == 2
    assert "one caption per image" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(synthetic), "--split", "dev"]) == 2
    assert "no 'dev' split" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("metrics", "java", "message"),
    [
        ("bleu,spice", "/usr/bin/java", "SPICE cannot run: offline"),  # no CoreNLP, and no download when offline
        ("cider,meteor", None, "METEOR cannot run: needs Java, which is not on PATH"),
    ],
)
def test_a_named_metric_that_cannot_run_is_a_one_line_error(
    tiny_model_dir: Path,
    synthetic: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    metrics: str,
    java: str | None,
    message: str,
) -> None:
    """A metric named in --metrics that cannot run here is an error (exit 2,
    one line), not a note with exit 0; the captions (results.json) are written first."""
    from pycocoevalcap.spice import get_stanford_models, spice

    from prefixcap.evaluation import coco_metrics

    if Path(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB, f"{get_stanford_models.JAR}.jar").exists():
        pytest.skip("CoreNLP is installed, so SPICE can run")
    monkeypatch.setattr(coco_metrics.shutil, "which", lambda name: java)
    monkeypatch.setattr(spice, "get_stanford_models", lambda: pytest.fail("downloaded CoreNLP while offline"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "eval"
    command = ["evaluate", "--model", str(tiny_model_dir), "--data", str(synthetic), "--workers", "0",
               "--max-new-tokens", "5", "--metrics", metrics, "--out", str(out)]  # fmt: skip
    assert main(command) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line or "note" in line] == [
        line for line in err.splitlines() if line.startswith(f"error: {message}")
    ], err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    test_ids = {record.image_id for record in load_records(synthetic) if record.split == "test"}
    assert {str(row["image_id"]) for row in read_json(out / "results.json")} == test_ids
    assert not (out / "metrics.json").exists()


def test_load_split_reads_a_feature_store_like_its_dataset(synthetic: Path, features: Path) -> None:
    """A feature store's split has its dataset's images, train captions and one stored embedding per image."""
    from prefixcap.errors import UserError
    from prefixcap.evaluation.references import load_split

    from_data, no_embeddings, no_store = load_split(synthetic, split="test")
    assert no_embeddings is None and no_store is None
    from_store, embeddings, store = load_split(features, split="test")
    assert store is not None and store.path == features
    assert [r.image_id for r in from_store.records] == [r.image_id for r in from_data.records]
    assert sorted(from_store.train_captions) == sorted(from_data.train_captions)
    assert embeddings.shape == (len(from_store.records), store.embed_dim)
    with pytest.raises(UserError, match="no 'dev' split"):
        load_split(features, split="dev")


@pytest.mark.slow
def test_trained_model_scores_higher_than_untrained(
    tiny_components: tuple[Path, Path], synthetic: Path, features: Path, tmp_path: Path
) -> None:
    from prefixcap import CaptionModel

    clip_dir, gpt2_dir = tiny_components
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(features),
                "--decoder",
                str(gpt2_dir),
                "--out",
                str(run),
                "--prefix-length",
                "4",
                "--epochs",
                "4",
                "--batch-size",
                "32",
                "--lr",
                "3e-3",
                "--val-images",
                "8",
            ]
        )
        == 0
    )
    torch.manual_seed(0)
    untrained = tmp_path / "untrained"
    CaptionModel.from_components(clip_dir, gpt2_dir, mapper="mlp", prefix_length=4).save_pretrained(untrained)

    # The trained model reads the feature store; the untrained one encodes the images on the fly.
    common = ["--metrics", "bleu,cider,stats", "--max-new-tokens", "12", "--batch-size", "16"]
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(run / "best"),
                "--data",
                str(features),
                "--out",
                str(tmp_path / "trained"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(untrained),
                "--data",
                str(synthetic),
                "--out",
                str(tmp_path / "base"),
                "--workers",
                "0",
                *common,
            ]
        )
        == 0
    )

    test_ids = {r.image_id for r in load_records(synthetic) if r.split == "test"}
    for name in ("trained", "base"):
        results = read_json(tmp_path / name / "results.json")
        assert {row["image_id"] for row in results} == test_ids  # every test image, once
        assert (tmp_path / name / "report.html").is_file()
    trained, base = read_json(tmp_path / "trained" / "metrics.json"), read_json(tmp_path / "base" / "metrics.json")
    assert trained["num_images"] == base["num_images"] == len(test_ids)
    assert cider_of(trained) > cider_of(base) + 50
    assert (
        trained["metrics"]["mean_length"] > 0 and "novel_captions_pct" in trained["metrics"]
    )  # stats ran, train split known


def test_evaluate_refuses_to_replace_an_earlier_evaluation_without_overwrite(
    image_dependent_model_dir: Path, tiny_model_dir: Path, features: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`evaluate` wrote ./evaluation by default and silently replaced it, so a second model's
    run (the README's SCST example) overwrote the first one's report. The default folder is now
    evaluation/NAME, one per model, and an earlier evaluation is kept unless --overwrite."""
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--data", str(features), "--metrics", "stats", "--max-new-tokens", "8"]
    assert main([*args, "--model", str(image_dependent_model_dir)]) == 0
    first = Path("evaluation") / f"{image_dependent_model_dir.parent.name}-{image_dependent_model_dir.name}"
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"wrote {first / 'metrics.json'}")
    kept = {name: (first / name).read_bytes() for name in ("results.json", "metrics.json", "report.html")}

    # a second model gets its own default folder
    assert main([*args, "--model", str(tiny_model_dir)]) == 0
    second = Path("evaluation") / f"{tiny_model_dir.parent.name}-{tiny_model_dir.name}"
    assert second != first and (second / "metrics.json").is_file()
    capsys.readouterr()

    # the same folder again: refused in one line, before any captioning, and nothing changes
    assert main([*args, "--model", str(tiny_model_dir), "--out", str(first)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {first}: already holds a prefixcap evaluation; pass --overwrite to replace it\n"
    assert {name: (first / name).read_bytes() for name in kept} == kept
    assert main([*args, "--model", str(tiny_model_dir), "--out", str(first), "--overwrite"]) == 0
    assert (first / "results.json").read_bytes() != kept["results.json"]  # the other model's captions

    # a folder holding anything else is never written into
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main([*args, "--model", str(tiny_model_dir), "--out", "notes", "--overwrite"]) == 2
    assert "is not empty and is not a prefixcap evaluation" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "notes").iterdir()) == ["todo.txt"]
