"""Retrieval-augmented training and captioning: each training image retrieves its neighbours, never
itself; the model records that it expects retrieval; the loss covers the caption only; `caption`,
the Captioner, sidecars and the server caption with any datastore and show what was retrieved.

The tiny CLIP is first taught that images go with their captions (`prefixcap.testing.align_clip`):
a random CLIP's image and text embeddings share no space, so nothing could be retrieved by image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixcap.cli import main
from prefixcap.data import load_records
from prefixcap.errors import ModelLoadError
from prefixcap.model.config import CaptionConfig

pytest.importorskip("faiss")  # the retrieval extra
pytest.importorskip("accelerate")  # the train extra

TEMPLATE = "{captions} a photo of"
# Two domains of the synthetic shapes: A's objects are B's backgrounds and the other way round.
DOMAIN_A = [(obj, bg) for obj in ("red", "green", "blue") for bg in ("yellow", "purple", "orange")]
DOMAIN_B = [(bg, obj) for obj, bg in DOMAIN_A]
TRAIN = ["--prefix-length", "4", "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--val-images", "0",
         "--best-metric", "loss", "--seed", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Tiny learnable components with an aligned CLIP, both domains' data, feature stores of A and
    B, a datastore of each domain's train captions, and a model trained with retrieval on A."""
    from prefixcap.data.synth import make_synthetic_dataset
    from prefixcap.pipeline.prepare import prepare_features
    from prefixcap.retrieval import build_datastore
    from prefixcap.testing import align_clip, build_learnable_components

    root = tmp_path_factory.mktemp("retrieval")
    clip, gpt2 = build_learnable_components(root / "models")
    a = make_synthetic_dataset(root / "A", num_images=120, image_size=16, pairs=DOMAIN_A, seed=1)
    b = make_synthetic_dataset(root / "B", num_images=90, image_size=16, pairs=DOMAIN_B, seed=2)
    train = [record for record in load_records(a) + load_records(b) if record.split == "train"]
    align_clip(clip, [record.image for record in train], [record.captions[0] for record in train])
    prepare_features(a, root / "featA", vision_encoder=clip, num_workers=0)
    prepare_features(b, root / "featB", vision_encoder=clip, num_workers=0)
    build_datastore(a, root / "dsA", encoder=clip, splits=["train"], device="cpu")
    build_datastore(b, root / "dsB", encoder=clip, splits=["train"], device="cpu")
    assert main(["train", str(root / "featA"), "--decoder", str(gpt2), "--out", str(root / "run"),
                 "--datastore", str(root / "dsA"), "--retrieve-k", "2", "--retrieval-template", TEMPLATE,
                 *TRAIN]) == 0  # fmt: skip
    return {"root": root, "clip": clip, "gpt2": gpt2, "A": a, "B": b, "model": root / "run" / "best"}


def colours(caption: str) -> tuple[str, str]:
    """(object, background) of a synthetic caption "a red shape on a yellow background"."""
    words = caption.split()
    return words[1], words[5]


# ---------------------------------------------------------------------- training
def test_each_training_image_retrieves_its_nearest_captions_never_its_own(world) -> None:
    """Against brute force over the store's vectors: the k nearest captions of other images, by id
    for images the store holds (train), by caption text for the others (val: not in the store)."""
    from transformers import AutoTokenizer

    from prefixcap.pipeline.features import FeatureStore
    from prefixcap.retrieval import Datastore
    from prefixcap.retrieval.index import all_vectors
    from prefixcap.retrieval.training import retrieval_records

    store, features = Datastore.load(world["root"] / "dsA"), FeatureStore(world["root"] / "featA")
    tokenizer = AutoTokenizer.from_pretrained(world["gpt2"])
    vectors = all_vectors(store.index)
    for split, by_id in (("train", True), ("val", False)):
        records, embeds = features.records(split), features.embeddings(split).float()
        prompted, found, exclusion = retrieval_records(
            store, records, embeds, k=2, template=TEMPLATE, tokenizer=tokenizer, max_tokens=30
        )
        assert (exclusion.by_id, exclusion.by_text) == ((len(records), 0) if by_id else (0, len(records)))
        queries = torch.nn.functional.normalize(embeds, dim=-1).numpy()
        for record, result, query, with_prompt in zip(records, found, queries, prompted):
            if by_id:
                banned = store.image_of_row == store.image_ids.index(record.image_id)
            else:
                banned = np.isin(np.array(store.captions), record.captions)
            scores = np.where(banned, -np.inf, vectors @ query)
            best = np.argsort(-scores, kind="stable")[:2]
            assert np.allclose(result.scores, scores[best], atol=1e-5)
            assert record.image_id not in result.image_ids and len(result.captions) == 2
            if not by_id:
                assert not set(result.captions) & set(record.captions)
            assert with_prompt.prompt == f"{result.captions[0]}. {result.captions[1]}. a photo of"
        unexcluded = store.search(embeds[:8], 1)
        if by_id:  # the precondition: without exclusion, some images find their own caption first
            assert any(r.image_ids[0] == record.image_id for r, record in zip(unexcluded, records))


def test_the_model_records_retrieval_and_learns_the_caption_only(world, tmp_path) -> None:
    from prefixcap.pipeline.features import FeatureStore
    from prefixcap.training import TrainConfig
    from prefixcap.training.trainer import Trainer

    saved = CaptionConfig.load(world["model"])
    assert (saved.retrieval_k, saved.retrieval_template, saved.retrieval_prompt_tokens) == (2, TEMPLATE, 30)
    assert saved.prompt is None
    config = TrainConfig(features=str(world["root"] / "featA"), out=str(tmp_path / "run"), decoder=str(world["gpt2"]),
                         datastore=str(world["root"] / "dsA"), retrieve_k=2, retrieval_template=TEMPLATE,
                         prefix_length=4, epochs=1, val_images=0, best_metric="loss")  # fmt: skip
    trainer = Trainer(config)
    assert trainer.model.config.retrieval_k == 2 and trainer.model.config.prompt is None
    batch = trainer.train_set.batch(np.arange(4))
    tokenizer = trainer.model.tokenizer
    records = FeatureStore(world["root"] / "featA").records("train")  # one caption each: row i is image i
    for row, prompt_length in zip(range(4), trainer.train_set.prompt_lengths[:4]):
        prompt = tokenizer.decode(batch["input_ids"][row, :prompt_length])
        assert prompt.endswith("a photo of") and prompt.count(".") == 2  # two retrieved captions
        assert (batch["labels"][row, :prompt_length] == -100).all()  # the prompt is not learned...
        caption = batch["labels"][row, prompt_length:]
        caption = caption[(caption != -100) & (caption != tokenizer.eos_token_id)]
        assert tokenizer.decode(caption).strip() == records[row].captions[0]  # ...the caption is


@pytest.mark.parametrize(
    "change, message",
    [
        ({"retrieval_k": 2}, "must be all set or all null"),
        ({"retrieval_k": 0, "retrieval_template": TEMPLATE, "retrieval_prompt_tokens": 30}, "retrieval_k must be"),
        ({"retrieval_k": 2, "retrieval_template": "no field", "retrieval_prompt_tokens": 30}, "{captions} once"),
        ({"retrieval_k": 2, "retrieval_template": TEMPLATE, "retrieval_prompt_tokens": 30, "prompt": "a"},
         "prompt must be null"),
    ],
)  # fmt: skip
def test_a_models_retrieval_fields_are_checked_on_load(world, tmp_path, change, message) -> None:
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    values = json.loads((model / "config.json").read_text())
    values.update({"retrieval_k": None, "retrieval_template": None, "retrieval_prompt_tokens": None, **change})
    (model / "config.json").write_text(json.dumps(values))
    with pytest.raises(ModelLoadError, match=message):
        CaptionConfig.load(model)
