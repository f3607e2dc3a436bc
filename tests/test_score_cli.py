"""`prefixcap score`: results files against JSONL, COCO and Karpathy references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefixcap.cli import main
from prefixcap.data import load_records
from prefixcap.data.synth import make_synthetic_dataset
from prefixcap.testing import build_roberta

WRONG = "a purple shape on a gray background"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """captions.jsonl with train/val/test splits (8 test images) and the images."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_images=80, seed=1)


@pytest.fixture(scope="module")
def clip_dir(tiny_components: tuple[Path, Path]) -> Path:
    return tiny_components[0]


def write_results(path: Path, captions: dict) -> Path:
    path.write_text(json.dumps([{"image_id": image_id, "caption": caption} for image_id, caption in captions.items()]))
    return path


def score(results: Path, references: Path, *options: str | Path) -> int:
    """`prefixcap score --results RESULTS --references REFERENCES OPTIONS...`, in process."""
    return main(["score", "--results", str(results), "--references", str(references), *map(str, options)])


def half_right(records) -> dict[str, str]:
    """The true caption for even-numbered images, a wrong one for the others."""
    return {r.image_id: r.captions[0] if n % 2 == 0 else WRONG for n, r in enumerate(records)}


def read_json(path: Path):
    return json.loads(path.read_text())


def suffix(metrics_json: dict) -> str:
    return "" if metrics_json["settings"]["tokenization"] == "ptb" else " (simple tokenization)"


def test_score_jsonl_writes_metrics_and_report(synthetic: Path, clip_dir: Path, tmp_path: Path) -> None:
    test = [r for r in load_records(synthetic) if r.split == "test"]
    results = write_results(tmp_path / "results.json", half_right(test))
    status = score(results, synthetic, "--metrics", "bleu,rouge,cider,clipscore,stats", "--clip-model", clip_dir)
    assert status == 0
    summary = read_json(tmp_path / "metrics.json")  # --out defaults to the results' folder
    cider = "CIDEr" + suffix(summary)
    assert summary["num_images"] == len(test) == 8
    assert {cider, "BLEU-4" + suffix(summary), "ROUGE-L" + suffix(summary), "CLIPScore", "RefCLIPScore"} <= set(
        summary["metrics"]
    )
    assert summary["metrics"]["novel_captions_pct"] == 0  # every caption is also a training caption
    assert summary["settings"]["clipscore"] == {"model": str(clip_dir), "w": 2.5, "prompt": "A photo depicts "}

    per_image = {row["image_id"]: row for row in read_json(tmp_path / "per_image.json")}
    right = [per_image[r.image_id][cider] for n, r in enumerate(test) if n % 2 == 0]
    wrong = [per_image[r.image_id][cider] for n, r in enumerate(test) if n % 2 == 1]
    assert min(right) > max(wrong)
    report = (tmp_path / "report.html").read_text()
    assert WRONG in report and test[0].captions[0] in report


@pytest.mark.slow  # a fresh interpreter, as a user would run it
def test_score_without_java_degrades(synthetic: Path, tmp_path: Path) -> None:
    test = [r for r in load_records(synthetic) if r.split == "test"]
    results = write_results(tmp_path / "results.json", half_right(test))
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "java").exists())
    env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefixcap",
            "score",
            "--results",
            str(results),
            "--references",
            str(synthetic),
            "--out",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert sum("Java not found" in line for line in done.stderr.splitlines()) == 1
    summary = read_json(tmp_path / "out" / "metrics.json")
    assert summary["settings"]["tokenization"] == "simple"
    assert {"BLEU-4 (simple tokenization)", "ROUGE-L (simple tokenization)", "CIDEr (simple tokenization)"} <= set(
        summary["metrics"]
    )
    assert not {"BLEU-4", "CIDEr", "METEOR", "SPICE"} & set(summary["metrics"])
    assert {"METEOR", "SPICE"} <= set(summary["skipped"])
    assert "CIDEr (simple tokenization)" in (tmp_path / "out" / "report.html").read_text()


def test_score_against_coco_and_karpathy_files(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = load_records(synthetic)
    outside = "--allow-outside-root"  # the files below name the synthetic set's images, in another folder
    # An official COCO caption file with integer ids and several captions per image.
    coco = {
        "images": [{"id": 100 + n, "file_name": r.image} for n, r in enumerate(records[:6])],
        "annotations": [
            {"image_id": 100 + n, "caption": c} for n, r in enumerate(records[:6]) for c in (*r.captions, "a shape")
        ],
    }
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    results = write_results(tmp_path / "coco_results.json", {100 + n: r.captions[0] for n, r in enumerate(records[:6])})
    assert (
        score(
            results, tmp_path / "captions_val2014.json", "--metrics", "bleu,cider", "--out", tmp_path / "coco", outside
        )
        == 0
    )
    assert read_json(tmp_path / "coco" / "metrics.json")["num_images"] == 6

    # A Karpathy split file: only the test split is scored; train captions give novelty.
    karpathy = {
        "images": [
            {
                "filepath": "",
                "filename": r.image,
                "cocoid": 200 + n,
                "split": ["train", "restval", "val", "test"][n % 4],
                "sentences": [{"raw": c, "tokens": c.split()} for c in r.captions],
            }
            for n, r in enumerate(records[:12])
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    test_ids = [200 + n for n in range(12) if n % 4 == 3]
    results = write_results(tmp_path / "k_results.json", {i: "a brand new caption" for i in test_ids[:2]})
    assert (
        score(
            results,
            tmp_path / "dataset_coco.json",
            "--metrics",
            "bleu,cider,stats",
            "--out",
            tmp_path / "karpathy",
            outside,
        )
        == 0
    )
    summary = read_json(tmp_path / "karpathy" / "metrics.json")
    assert summary["num_images"] == 2 and summary["metrics"]["novel_captions_pct"] == 100
    assert "scoring 2 of the 3 reference images" in capsys.readouterr().err

    # A train image is not in the test split: a clear error, not a silent score.
    results = write_results(tmp_path / "bad.json", {200: "a caption"})
    assert score(results, tmp_path / "dataset_coco.json", outside) == 2
    assert "not in the references, e.g. '200'" in capsys.readouterr().err


def test_score_bertscore_options(synthetic: Path, tmp_path: Path) -> None:
    test = [r for r in load_records(synthetic) if r.split == "test"]
    roberta = build_roberta(tmp_path / "roberta", [c for r in test for c in r.captions])
    baseline = tmp_path / "baseline.tsv"
    baseline.write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n1,0.2,0.2,0.2\n2,0.3,0.3,0.3\n")
    results = write_results(tmp_path / "results.json", half_right(test))
    assert (
        score(
            results,
            synthetic,
            "--metrics",
            "bertscore",
            "--bertscore-model",
            roberta,
            "--bertscore-layers",
            "2",
            "--bertscore-baseline",
            baseline,
        )
        == 0
    )
    summary = read_json(tmp_path / "metrics.json")
    assert summary["settings"]["bertscore"]["num_layers"] == 2
    raw, rescaled = summary["metrics"]["BERTScore-F1"], summary["metrics"]["BERTScore-F1 (rescaled)"]
    assert rescaled == pytest.approx((raw - 0.3) / 0.7)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--metrics", "bleu,blue"], "unknown metric(s) blue"),
        (["--metrics", "clipscore", "--images", "/nonexistent"], "CLIPScore needs the images"),
        (
            ["--split", "val", "--references", "{tmp}/captions_train2014.json"],
            None,
        ),  # a single-split file is used whole
    ],
)
def test_score_errors_are_one_line(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture, arguments: list[str], message: str | None
) -> None:
    records = load_records(synthetic)[:3]
    coco = {
        "images": [{"id": n, "file_name": Path(r.image).name} for n, r in enumerate(records)],
        "annotations": [{"image_id": n, "caption": r.captions[0]} for n, r in enumerate(records)],
    }
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    results = write_results(tmp_path / "results.json", {n: "a caption" for n in range(3)})
    base = [
        "score",
        "--results",
        str(results),
        "--references",
        str(tmp_path / "captions_train2014.json"),
        "--metrics",
        "bleu",
    ]
    status = main(base + [argument.format(tmp=tmp_path) for argument in arguments])
    err = capsys.readouterr().err
    if message is None:
        assert status == 0
    else:
        assert status == 2
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0]


def test_bad_results_file(tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "results.json").write_text('{"image_id": 1}')
    assert score(tmp_path / "results.json", synthetic) == 2
    assert "expected a COCO results list" in capsys.readouterr().err


def test_metric_names_in_help_match_the_library() -> None:
    from prefixcap.cli.common import (
        METRIC_NAMES,  # spelled out so that --help needs no heavy import
    )
    from prefixcap.evaluation import ALL_METRICS

    assert METRIC_NAMES.split(",") == list(ALL_METRICS)
