"""Scoring a student against its teacher: the references' own CLIPScore beside the captions'."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from prefixcap.evaluation import Sample, ScoreConfig, score_samples
from prefixcap.evaluation.clipscore import REFERENCES_CLIPSCORE, CLIPScorer

COLOURS = {"red": (220, 20, 20), "green": (30, 170, 40), "blue": (30, 60, 220)}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("teacher-images")
    for name, colour in COLOURS.items():
        Image.new("RGB", (40, 40), colour).save(folder / f"{name}.png")
    return [str(folder / f"{name}.png") for name in COLOURS]


def test_the_references_get_their_own_clipscore(tiny_components: tuple[Path, Path], images: list[str]) -> None:
    scorer = CLIPScorer.from_pretrained(str(tiny_components[0]), device="cpu")
    captions = ["a red square", "green", "blue sky"]
    references = [["red"], ["a green thing", "grass"], ["blue"]]
    result = scorer.score(images, captions, references)
    # each image's references scored as captions are, then averaged per image
    as_captions = [scorer.score([image] * len(refs), refs).clip_s.mean() for image, refs in zip(images, references)]
    assert result.references_clip_s.tolist() == pytest.approx([float(value) for value in as_captions], abs=1e-6)
    assert result.references_clip_s.tolist() != pytest.approx(result.clip_s.tolist())  # not the captions' score
    summary = result.summary()
    assert summary[REFERENCES_CLIPSCORE] == pytest.approx(result.references_clip_s.mean().item())

    samples = [Sample(Path(i).stem, c, tuple(r), i) for i, c, r in zip(images, captions, references)]
    config = ScoreConfig(("clipscore",), clip_model=str(tiny_components[0]), device="cpu")
    evaluation = score_samples(samples, config)
    assert evaluation.metrics[REFERENCES_CLIPSCORE] == pytest.approx(summary[REFERENCES_CLIPSCORE])
    assert evaluation.per_image["red"][REFERENCES_CLIPSCORE] == pytest.approx(as_captions[0].item(), abs=1e-6)
