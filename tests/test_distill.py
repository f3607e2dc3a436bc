"""The student learns from the teacher: a teacher trained on the synthetic task, served by
`prefixcap serve` as an OpenAI endpoint, labels images that have no captions; a student trained
only on those labels captions held-out images as well."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from prefixcap import Captioner
from prefixcap.cli import main
from prefixcap.testing import build_learnable_components
from tests.helpers_pipeline import exact_matches
from tests.helpers_serve_process import serve_in_subprocess


@pytest.mark.slow
def test_a_student_trained_only_on_teacher_labels_captions_held_out_images(tmp_path, capsys, synthetic_model):
    teacher, _ = synthetic_model
    # Unlabelled images: a fresh synthetic set (another seed), its captions kept aside as the truth.
    assert main(["synth", str(tmp_path / "fresh"), "--num-images", "600", "--seed", "1"]) == 0
    truth: dict[str, dict[str, str]] = {"train": {}, "val": {}, "test": {}}
    for line in (tmp_path / "fresh" / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        target = tmp_path / "unlabelled" / row["split"] / Path(row["image"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "fresh" / row["image"], target)
        truth[row["split"]][target.name] = row["caption"]
    shutil.rmtree(tmp_path / "fresh")

    labels = tmp_path / "labels.jsonl"
    with serve_in_subprocess(teacher, log_path=tmp_path / "serve.log", env={"OMP_NUM_THREADS": "1"}, timeout=120) as (
        _,
        url,
    ):
        for split in ("train", "val", "test"):
            assert main(["label", str(tmp_path / "unlabelled" / split), "--teacher", f"openai:{url}/v1",
                         "--out", str(labels), "--split", split, "--image-format", "png", "--concurrency", "4"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 600 and {row["split"] for row in rows} == {"train", "val", "test"}
    held_out = {Path(row["image"]).name: row["caption"] for row in rows if row["split"] == "test"}
    teacher_right = sum(held_out[name] == caption for name, caption in truth["test"].items())
    assert teacher_right >= 0.9 * len(truth["test"])  # precondition: a teacher worth learning from

    clip, gpt2 = build_learnable_components(tmp_path / "student-models")
    assert main(["prepare", str(labels), "--out", str(tmp_path / "features"), "--vision-encoder", str(clip),
                 "--workers", "0"]) == 0  # fmt: skip
    assert main(["train", str(tmp_path / "features"), "--decoder", str(gpt2), "--out", str(tmp_path / "student"),
                 "--prefix-length", "4", "--epochs", "30", "--batch-size", "16", "--lr", "3e-3",
                 "--val-images", "60", "--seed", "0"]) == 0  # fmt: skip
    student = Captioner.from_pretrained(tmp_path / "student" / "best")
    names = sorted(truth["test"])
    captions = student([str(tmp_path / "unlabelled" / "test" / name) for name in names])
    right = exact_matches(captions, [truth["test"][name] for name in names])
    assert right >= 0.9 * len(names), f"{right}/{len(names)} held-out images captioned right"

    # evaluate scores the student against the teacher's held-out captions
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "student" / "best"), "--data", str(labels), "--split", "test",
                 "--metrics", "bleu,cider", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    bleu4 = next(value for name, value in metrics["metrics"].items() if name.startswith("BLEU-4"))  # PTB or simple
    assert metrics["num_images"] == len(names) and bleu4 > 80
