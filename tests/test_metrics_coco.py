"""COCO metrics: parity with pycocoevalcap's COCOEvalCap, and graceful degradation without Java/SPICE."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import pytest

from prefixcap.errors import UserError
from prefixcap.evaluation import coco_metrics
from prefixcap.evaluation.coco_metrics import coco_scores, ptb_tokenize, simple_tokenize

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java on PATH")

# Eight images with three to five references each; cased, punctuated and contracted like COCO.
REFERENCES = {
    1: [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave.",
        "Man on a surfboard in the ocean.",
    ],
    2: [
        "Two dogs playing with a ball in the grass.",
        "Dogs chase a red ball on a lawn.",
        "Two puppies play outside.",
        "A pair of dogs running on grass.",
    ],
    3: [
        "A plate of food with broccoli and rice.",
        "Rice, broccoli and chicken on a white plate.",
        "A healthy meal on a plate.",
        "Dinner plate with vegetables.",
        "A plate holds rice and greens.",
    ],
    4: ["A cat sitting on a couch.", "The cat's asleep on the sofa.", "A grey cat lies on a couch."],
    5: [
        "A red bus driving down a city street.",
        "A double-decker bus on the road.",
        "A bus in traffic.",
        "The red bus is parked near a sidewalk.",
    ],
    6: ["A kitchen with white cabinets and a stove.", "An empty kitchen.", "A clean kitchen with wooden floors."],
    7: [
        "A giraffe standing next to a tree.",
        "A tall giraffe eats leaves.",
        "Giraffe in a zoo enclosure.",
        "A giraffe near some trees.",
        "One giraffe beside a tree.",
    ],
    8: ["People flying kites on a beach.", "Kites in the sky above the sand.", "A crowd on the beach with kites."],
}
PREDICTIONS = {
    1: "a man riding a wave on a surfboard",
    2: "two dogs playing with a frisbee in the grass",
    3: "a plate of food with rice and broccoli",
    4: "a cat laying on a couch",
    5: "a red bus on a city street",
    6: "a kitchen with a stove and a sink",
    7: "a giraffe standing in a field",
    8: "a group of people flying kites on the beach",
}


def _as_strings(mapping: dict) -> dict:
    return {str(key): value for key, value in mapping.items()}


def test_simple_tokenize_lowercases_and_drops_punctuation() -> None:
    assert simple_tokenize("A Man, riding... a WAVE!") == "a man riding a wave"
    assert simple_tokenize("Café au lait, 2 cups;") == "café au lait 2 cups"
    assert simple_tokenize(" -- ") == ""


@needs_java
@pytest.mark.slow  # two METEOR JVMs: ours and COCOEvalCap's
def test_scores_are_identical_to_cocoevalcap(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:  # COCOEvalCap always runs SPICE, which needs a CoreNLP download
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO()
    coco.dataset = {
        "images": [{"id": image_id} for image_id in REFERENCES],
        "annotations": [
            {"id": n, "image_id": image_id, "caption": caption}
            for n, (image_id, caption) in enumerate((i, c) for i, refs in REFERENCES.items() for c in refs)
        ],
    }
    coco.createIndex()
    results = coco.loadRes([{"image_id": image_id, "caption": caption} for image_id, caption in PREDICTIONS.items()])
    official = coco_eval.COCOEvalCap(coco, results)
    official.evaluate()

    ours = coco_scores(_as_strings(PREDICTIONS), _as_strings(REFERENCES), metrics=("bleu", "meteor", "rouge", "cider"))
    names = {
        "BLEU-1": "Bleu_1",
        "BLEU-2": "Bleu_2",
        "BLEU-3": "Bleu_3",
        "BLEU-4": "Bleu_4",
        "METEOR": "METEOR",
        "ROUGE-L": "ROUGE_L",
        "CIDEr": "CIDEr",
    }
    assert ours.tokenization == "ptb"
    assert set(ours.corpus) == set(names)
    for name, official_name in names.items():
        assert ours.corpus[name] == 100 * official.eval[official_name], name
        for image_id in REFERENCES:
            assert ours.per_image[str(image_id)][name] == 100 * official.imgToEval[image_id][official_name]
    assert 0 < ours.corpus["CIDEr"] < 1000 and 0 < ours.corpus["BLEU-4"] < 100


@needs_java
def test_ptb_tokenize_keeps_each_caption_on_its_image() -> None:
    # A stray "\r" splits a line for the Java tokenizer; empty captions vanish from its output.
    tokenized = ptb_tokenize({"a": ["Don't run\r\nfast!", ""], "b": [""], "c": ["The dog's ball."]})
    assert tokenized == {"a": ["do n't run fast", ""], "b": [""], "c": ["the dog 's ball"]}


def test_without_java_uses_simple_tokenization(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(coco_metrics.shutil, "which", lambda name: None)
    result = coco_scores(_as_strings(PREDICTIONS), _as_strings(REFERENCES))

    assert result.tokenization == "simple"
    assert set(result.skipped) == {"METEOR", "SPICE"}
    assert set(result.corpus) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Java not found" in lines[0]

    # The numbers are pycocoevalcap's scorers on simply tokenised text.
    from pycocoevalcap.cider.cider import Cider

    gts = {str(i): [simple_tokenize(c) for c in refs] for i, refs in REFERENCES.items()}
    res = {str(i): [simple_tokenize(c)] for i, c in PREDICTIONS.items()}
    assert result.corpus["CIDEr"] == 100 * Cider().compute_score(gts, res)[0]


def test_explicit_java_without_java_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coco_metrics.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="java is not on PATH"):
        coco_scores({"1": "a dog"}, {"1": ["a dog"]}, java=True)


def test_bad_inputs_are_reported() -> None:
    with pytest.raises(UserError, match="no reference captions.*'2'"):
        coco_scores({"1": "a dog", "2": "a cat"}, {"1": ["a dog"]}, java=False)
    with pytest.raises(ValueError, match="unknown COCO metrics"):
        coco_scores({"1": "a dog"}, {"1": ["a dog"]}, java=False, metrics=("bleu", "blue"))


@needs_java
def test_spice_download_failure_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from pycocoevalcap.spice import spice

    def offline() -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(spice, "get_stanford_models", offline)
    monkeypatch.setattr(coco_metrics, "offline", lambda: False)  # as if online: the download is attempted
    result = coco_scores(_as_strings(PREDICTIONS), _as_strings(REFERENCES), metrics=("spice", "bleu"))

    assert "BLEU-4" in result.corpus and "SPICE" not in result.corpus
    assert "download failed (Name or service not known)" in result.skipped["SPICE"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: SPICE skipped:")


@needs_java
def test_spice_java_failure_quotes_the_java_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from pycocoevalcap.spice import get_stanford_models, spice

    corenlp = Path(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB, f"{get_stanford_models.JAR}.jar")
    if corenlp.exists():
        pytest.skip("CoreNLP is installed, so SPICE's jar would run")
    monkeypatch.setattr(spice, "get_stanford_models", lambda: None)  # run the jar without CoreNLP
    monkeypatch.setattr(coco_metrics, "offline", lambda: False)  # as if online: the download is attempted
    result = coco_scores(_as_strings(PREDICTIONS), _as_strings(REFERENCES), metrics=("spice",))

    assert result.corpus == {}
    assert "Java program failed" in result.skipped["SPICE"] and "Error" in result.skipped["SPICE"]
    lines = capsys.readouterr().err.strip().splitlines()  # the Java stack trace is not among them
    assert len(lines) == 1 and lines[0].startswith("note: SPICE skipped:")
