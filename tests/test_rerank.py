"""Reranking at inference: a Reranker scores each image's candidate captions, which come back best
first with their scores, through the Captioner, the output formats, the CLI and the server."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from prefixcap import Captioner
from prefixcap.cli import main
from prefixcap.evaluation.clipscore import PROMPT, CLIPScorer
from prefixcap.jobs.writers import RecordWriter, Result, read_part, write_part
from prefixcap.pipeline.loop import RankedCaptions
from prefixcap.serving import ServerConfig, create_app
from prefixcap.testing import build_clip
from tests.helpers_serve import multipart
from tests.reference import captions_one_by_one

DECODING = {"num_beams": 3, "num_return_sequences": 3, "max_new_tokens": 6}


class LastIsBest:
    """A stub Reranker: the decoder's last candidate scores highest; records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, list[list[str]]]] = []

    def __call__(self, pixels: torch.Tensor, captions) -> list[list[float]]:
        self.calls.append((pixels, [list(texts) for texts in captions]))
        return [[float(position) for position in range(len(texts))] for texts in captions]


@pytest.fixture(scope="module")
def captioner(image_dependent_model_dir) -> Captioner:
    """A model whose beams differ with the image, so that reranking reorders them."""
    return Captioner.from_pretrained(image_dependent_model_dir, device="cpu", dtype="float32")


def test_captions_come_back_in_the_rerankers_order(captioner, example_images) -> None:
    images = example_images[:2]
    plain = captioner(images, **DECODING)
    reranker = LastIsBest()
    ranked = captioner(images, **DECODING, rerank=reranker)
    for before, after in zip(plain, ranked, strict=True):
        assert isinstance(after, RankedCaptions) and not isinstance(before, RankedCaptions)
        assert list(after) == before[::-1]  # the scores say the decoder's order is worst first
        assert after.scores == [2.0, 1.0, 0.0]
    assert any(before[0] != after[0] for before, after in zip(plain, ranked))  # a different top caption
    # the reranker saw the batch's uint8 pixels and each image's candidates
    [(pixels, candidates)] = reranker.calls
    assert pixels.dtype == torch.uint8 and pixels.shape[:2] == (2, 3)
    assert candidates == plain


def test_ties_keep_the_decoders_order_and_bad_score_counts_fail() -> None:
    assert RankedCaptions.ranked(["a", "b", "c"], [1, 3, 1]) == ["b", "a", "c"]
    with pytest.raises(ValueError, match="2 score"):
        RankedCaptions.ranked(["a", "b", "c"], [1, 2])


def test_jsonl_and_part_files_carry_the_scores() -> None:
    ranked = RankedCaptions.ranked(["low", "high"], [0.1, 0.9])
    out = io.StringIO()
    writer = RecordWriter(out, "jsonl", "out.jsonl")
    writer.write("a.jpg", ranked)
    writer.write("b.jpg", ["plain"])
    writer.close()
    first, second = map(json.loads, out.getvalue().splitlines())
    assert first == {"path": "a.jpg", "caption": "high", "captions": ["high", "low"], "scores": [0.9, 0.1]}
    assert second == {"path": "b.jpg", "caption": "plain", "captions": ["plain"]}  # without --rerank: as before
    # a folder job's part files keep the scores until the merge writes them
    assert Result.of("a.jpg", ranked).ranked.scores == [0.9, 0.1]


def test_part_round_trip_keeps_scores(tmp_path) -> None:
    ranked = RankedCaptions.ranked(["low", "high"], [0.1, 0.9])
    write_part(tmp_path / "part.jsonl", [Result.of("a.jpg", ranked), Result.of("b.jpg", ["plain"])])
    first, second = read_part(tmp_path / "part.jsonl")
    assert (list(first.ranked), first.ranked.scores) == (["high", "low"], [0.9, 0.1])
    assert second.ranked == ["plain"] and second.scores is None


def test_cli_reranks_with_the_models_own_clip(
    image_dependent_model_dir, tiny_components, example_images, tmp_path
) -> None:
    clip_dir, _ = tiny_components
    images = [str(path) for path in example_images[:2]]
    out = tmp_path / "ranked.jsonl"
    decoding = ["--num-beams", "3", "--num-captions", "3", "--max-new-tokens", "6"]
    args = [
        "caption",
        "--model",
        str(image_dependent_model_dir),
        *images,
        *decoding,
        "--format",
        "jsonl",
        "--output",
        str(out),
    ]
    assert main([*args, "--rerank", "clipscore", "--workers", "0"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [record["path"] for record in records] == images
    captioner = Captioner.from_pretrained(image_dependent_model_dir, device="cpu")
    alone = captions_one_by_one(captioner, images, num_beams=3, num_return_sequences=3, max_new_tokens=6)
    assert [sorted(record["captions"]) for record in records] == [sorted(captions) for captions in alone]
    scorer = CLIPScorer.from_pretrained(str(clip_dir), device="cpu")
    for record in records:
        assert len(record["scores"]) == len(record["captions"]) == 3
        assert record["scores"] == sorted(record["scores"], reverse=True)
        assert record["caption"] == record["captions"][0]
        # the scores are CLIPScore of each caption against the image file, as `prefixcap score` gives
        expected = scorer.score([record["path"]] * 3, record["captions"], workers=0).clip_s.tolist()
        assert record["scores"] == pytest.approx(expected, abs=1e-4)
    # into a folder: the scores survive the part files
    assert main([*args[:-1], str(tmp_path / "folder") + "/", "--rerank", "clipscore", "--workers", "0"]) == 0
    merged = [json.loads(line) for line in (tmp_path / "folder" / "captions.jsonl").read_text().splitlines()]
    assert [record["scores"] for record in merged] == [record["scores"] for record in records]
    # without --rerank nothing changes: no scores
    assert main([*args, "--workers", "0"]) == 0
    assert all("scores" not in json.loads(line) for line in out.read_text().splitlines())


def test_cli_rerank_errors_are_one_line(tiny_model_dir, example_images, capsys) -> None:
    image = str(example_images[0])
    assert main(["caption", "--model", str(tiny_model_dir), image, "--rerank-clip", str(tiny_model_dir)]) == 2
    assert "add --rerank clipscore" in capsys.readouterr().err
    # a model folder is no CLIP: the error names the option that chooses one
    args = ["caption", "--model", str(tiny_model_dir), image, "--rerank", "clipscore"]
    assert main([*args, "--rerank-clip", str(tiny_model_dir), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot load CLIP model {str(tiny_model_dir)!r}") and "--rerank-clip" in err[-1]


def test_captions_longer_than_the_text_towers_positions_are_cut_to_fit(
    image_dependent_model_dir, tiny_components, example_images, tmp_path
) -> None:
    """A CLIP whose tokenizer sets no length limit (as some hub checkpoints) used to crash reranking
    ("Sequence length must be less than max_position_embeddings"): captions are cut to the text
    tower's positions, the same cut a tokenizer that knows the limit makes."""
    clip_dir, _ = tiny_components
    unlimited = shutil.copytree(clip_dir, tmp_path / "clip")
    config = json.loads((unlimited / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (unlimited / "tokenizer_config.json").write_text(json.dumps(config))
    scorer = CLIPScorer.from_pretrained(str(unlimited), device="cpu")
    positions = scorer.model.config.text_config.max_position_embeddings
    assert scorer.tokenizer.model_max_length > positions  # the precondition: the tokenizer would not cut
    out = tmp_path / "ranked.jsonl"
    args = ["caption", "--model", str(image_dependent_model_dir), *map(str, example_images[:2]), "--format", "jsonl"]
    rerank = ["--num-captions", "2", "--rerank", "clipscore", "--rerank-clip", str(unlimited)]
    assert main([*args, *rerank, "--output", str(out), "--workers", "0"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(
        len(scorer.tokenizer(PROMPT + caption).input_ids) > positions for r in records for caption in r["captions"]
    )
    limited = CLIPScorer.from_pretrained(str(clip_dir), device="cpu")  # its tokenizer cuts at 32
    for record in records:
        expected = limited.score([record["path"]] * 2, record["captions"], workers=0).clip_s.tolist()
        assert record["scores"] == pytest.approx(sorted(expected, reverse=True), abs=1e-4)


def served_scores_are_clip_s(answer: list, images: list, scorer: CLIPScorer) -> None:
    """Each image's answer holds CLIP-S of each caption against that image, best first."""
    for entry, path in zip(answer, images, strict=True):
        captions, scores = [item["generated_text"] for item in entry], [item["score"] for item in entry]
        assert scores == sorted(scores, reverse=True)
        expected = scorer.score([str(path)] * len(captions), captions, workers=0).clip_s.tolist()
        assert scores == pytest.approx(expected, abs=1e-4)


def test_server_rerank_field(captioner, example_images, tiny_components) -> None:
    images = example_images[:2]
    payload = {"images": [base64.b64encode(path.read_bytes()).decode() for path in images], **DECODING}
    app = create_app(captioner, ServerConfig(model_name="tiny", max_batch_size=8))
    with TestClient(app) as client:
        plain = client.post("/v1/caption", json=payload)
        ranked = client.post("/v1/caption", json={**payload, "rerank": "clipscore"})
        wrong = client.post("/v1/caption", json={**payload, "rerank": "bleu"})
    assert plain.status_code == ranked.status_code == 200
    alone = captions_one_by_one(captioner, images, **DECODING)
    assert [[item["generated_text"] for item in entry] for entry in plain.json()] == alone
    for before, after in zip(plain.json(), ranked.json(), strict=True):
        assert all(set(item) == {"generated_text"} for item in before)  # no rerank: the answer as before
        assert sorted(item["generated_text"] for item in after) == sorted(item["generated_text"] for item in before)
    # the scores are CLIPScore against each image with the model's own CLIP, as `prefixcap score` gives
    served_scores_are_clip_s(ranked.json(), images, CLIPScorer.from_pretrained(str(tiny_components[0]), device="cpu"))
    assert wrong.status_code == 422 and wrong.json()["error"]["kind"] == "invalid_options"


def test_server_reranks_with_another_clip(captioner, example_images, tmp_path) -> None:
    """`serve --rerank-clip OTHER`: the scores come from OTHER, not from the model's own CLIP."""
    other = build_clip(tmp_path / "other-clip", seed=1)
    images = example_images[:2]
    payload = {"images": [base64.b64encode(path.read_bytes()).decode() for path in images], **DECODING}
    app = create_app(captioner, ServerConfig(model_name="tiny", rerank_clip=str(other)))
    with TestClient(app) as client:
        answer = client.post("/v1/caption", json={**payload, "rerank": "clipscore"})
    assert answer.status_code == 200, answer.text
    served_scores_are_clip_s(answer.json(), images, CLIPScorer.from_pretrained(str(other), device="cpu"))


def test_server_without_a_text_tower_answers_422(captioner, example_images, tiny_model_dir) -> None:
    payload = {"images": [base64.b64encode(example_images[0].read_bytes()).decode()], "rerank": "clipscore"}
    app = create_app(captioner, ServerConfig(model_name="tiny", rerank_clip=str(tiny_model_dir)))
    with TestClient(app) as client:
        answer = client.post("/v1/caption", json=payload)
    assert answer.status_code == 422
    assert "--rerank-clip" in answer.json()["error"]["message"]


def test_server_rerank_form_field(captioner, example_images) -> None:
    app = create_app(captioner, ServerConfig(model_name="tiny", max_batch_size=8))
    options = {name: str(value) for name, value in DECODING.items()}
    with TestClient(app) as client:
        answer = client.post(
            "/v1/caption", files=multipart(example_images[0].read_bytes()), data={**options, "rerank": "clipscore"}
        )
    assert answer.status_code == 200
    scores = [item["score"] for item in answer.json()[0]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_sidecars_are_written_best_first(image_dependent_model_dir, example_images, tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    image = folder / example_images[0].name
    image.write_bytes(example_images[0].read_bytes())
    decoding = ["--num-beams", "3", "--num-captions", "3", "--max-new-tokens", "6", "--workers", "0"]
    common = ["caption", "--model", str(image_dependent_model_dir), str(image), *decoding, "--rerank", "clipscore"]
    assert main([*common, "--sidecar"]) == 0
    assert main([*common, "--format", "jsonl", "--output", str(tmp_path / "out.jsonl")]) == 0
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert image.with_suffix(".txt").read_text().splitlines() == record["captions"]
    assert main([*common[:-2], "--format", "jsonl", "--output", str(tmp_path / "plain.jsonl")]) == 0
    plain = json.loads((tmp_path / "plain.jsonl").read_text())["captions"]
    assert sorted(plain) == sorted(record["captions"]) and plain != record["captions"]  # reordered, best first
