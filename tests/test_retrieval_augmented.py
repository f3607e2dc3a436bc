"""Retrieval-augmented training and captioning: each training image retrieves its neighbours, never
itself; the model records that it expects retrieval; the loss covers the caption only; `caption`,
the Captioner, sidecars and the server caption with any datastore and show what was retrieved.

The tiny CLIP is first taught that images go with their captions (`prefixcap.testing.align_clip`):
a random CLIP's image and text embeddings share no space, so nothing could be retrieved by image.

Domain transfer (issue 25): a model trained with retrieval on domain A captions domain B, whose
captions it never saw, from B's datastore. Each domain holds one orientation of every pair of six
colours: A has "a red shape on a green background", B "a green shape on a red background". Every
colour is an object in some of A's pairs and a background in others, so a word does not tell its
place in the caption: a model that follows its prompt must copy each word from where the retrieved
caption has it. And it must follow its prompt: trained with `--prefix-dropout 0.5`, half its
captions are learned without their image. Without prefix dropout the model learns A's captions from
the image alone and ignores its prompt (0 of B's test images right, measured with seeds 0 and 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixcap.cli import main
from prefixcap.data import load_records
from prefixcap.errors import ModelLoadError, UserError
from prefixcap.model.config import CaptionConfig

pytest.importorskip("faiss")  # the retrieval extra
pytest.importorskip("accelerate")  # the train extra

TEMPLATE = "{captions} a photo of"
# Two domains of the synthetic shapes: one orientation of each pair of six colours in A (a round-robin
# tournament: each colour an object in two or three pairs, a background in the others), the other in B.
SIX = ("red", "green", "blue", "yellow", "purple", "orange")
DOMAIN_A = [(SIX[i], SIX[j]) for i in range(6) for j in range(6) if (j - i) % 6 in (1, 2) or (j - i) % 6 == 3 and i < j]
DOMAIN_B = [(bg, obj) for obj, bg in DOMAIN_A]
TRAIN = ["--prefix-length", "4", "--epochs", "12", "--batch-size", "16", "--lr", "3e-3", "--val-images", "0",
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
    a = make_synthetic_dataset(root / "A", num_images=360, image_size=16, pairs=DOMAIN_A, seed=1)
    b = make_synthetic_dataset(root / "B", num_images=300, image_size=16, pairs=DOMAIN_B, seed=2)
    train = [record for record in load_records(a) + load_records(b) if record.split == "train"]
    align_clip(clip, [record.image for record in train], [record.captions[0] for record in train])
    prepare_features(a, root / "featA", vision_encoder=clip, num_workers=0)
    prepare_features(b, root / "featB", vision_encoder=clip, num_workers=0)
    build_datastore(a, root / "dsA", encoder=clip, splits=["train"], device="cpu")
    build_datastore(b, root / "dsB", encoder=clip, splits=["train"], device="cpu")
    assert main(["train", str(root / "featA"), "--decoder", str(gpt2), "--out", str(root / "run"),
                 "--datastore", str(root / "dsA"), "--retrieve-k", "2", "--retrieval-template", TEMPLATE,
                 "--prefix-dropout", "0.5", *TRAIN]) == 0  # fmt: skip
    # the last epoch's model: the val loss (A's val images, their captions left out of the store only by text)
    # rises as the model grows sure of itself, and picks an early epoch that has not yet learned to copy
    return {"root": root, "clip": clip, "gpt2": gpt2, "A": a, "B": b, "model": root / "run" / "last"}


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
    from prefixcap.training.state import STATE_DIR, load_training_state
    from prefixcap.training.trainer import Trainer

    saved = CaptionConfig.load(world["model"])
    assert (saved.retrieval_k, saved.retrieval_template, saved.retrieval_prompt_tokens) == (2, TEMPLATE, 30)
    assert saved.prompt is None
    assert load_training_state(world["model"] / STATE_DIR).config["prefix_dropout"] == 0.5  # the run's options
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


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prefix_dropout": 0.5}, "prefix_dropout needs datastore"),
        ({"prefix_dropout": 0.5, "datastore": "DS", "objective": "scst", "init": "M"}, "objective xent"),
        ({"prefix_dropout": 1.5, "datastore": "DS"}, r"prefix_dropout must be in \[0, 1\], got 1.5"),
    ],
)
def test_prefix_dropout_is_checked(options, message) -> None:
    from prefixcap.training import TrainConfig

    with pytest.raises(UserError, match=message):
        TrainConfig(**options)


def test_prefix_dropout_trains_a_share_of_the_captions_without_their_image(world) -> None:
    """In train mode, about P of the rows see the prefix of a zero embedding; in eval mode none do."""
    from prefixcap.model.caption_model import CaptionModel
    from prefixcap.training.objective import CaptionLoss

    model = CaptionModel.from_pretrained(world["model"])
    seen = []
    model.mapper.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().clone()))
    loss = CaptionLoss(model, prefix_dropout=0.5)
    embeds = torch.randn(400, model.config.embed_dim) + 3
    ids = torch.zeros(400, 2, dtype=torch.long)
    batch = {"image_embeds": embeds, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss.train()(**batch)
    zeroed = (seen[-1] == 0).all(dim=-1)
    assert 150 < int(zeroed.sum()) < 250 and torch.equal(seen[-1][~zeroed], embeds[~zeroed])
    loss.eval()(**batch)
    assert torch.equal(seen[-1], embeds)


# ---------------------------------------------------------------------- captioning
def b_test_records(world) -> list:
    return [record for record in load_records(world["B"]) if record.split == "test"]


def test_caption_with_another_domains_datastore_shows_what_each_image_retrieved(world, tmp_path, capsys) -> None:
    """`caption --datastore` of domain B (never seen in training): each image retrieves B captions
    of its own colours, and its caption is the model's after exactly that prompt."""
    from prefixcap.captioner import Captioner
    from prefixcap.retrieval import retrieval_prompt

    records = b_test_records(world)
    out = tmp_path / "captions.jsonl"
    assert main(["caption", *[record.image for record in records], "--model", str(world["model"]), "--datastore",
                 str(world["root"] / "dsB"), "--show-retrieved", "--format", "jsonl", "--output", str(out),
                 "--workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    assert "retrieval: 2 captions per image from" in capsys.readouterr().err
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [result["path"] for result in results] == [record.image for record in records]
    captioner = Captioner.from_pretrained(world["model"], device="cpu")
    pixels = torch.stack([captioner.preprocess(record.image) for record in records])
    prompts = [
        retrieval_prompt([r["caption"] for r in result["retrieved"]], captioner.model.tokenizer, 30, TEMPLATE)
        for result in results
    ]
    expected = captioner.model.caption(pixels=pixels, prompts=prompts)
    for result, caption in zip(results, expected):
        assert len(result["retrieved"]) == 2 and result["retrieved"][0]["score"] >= result["retrieved"][1]["score"]
        assert all(colours(r["caption"]) in DOMAIN_B for r in result["retrieved"])
        assert result["captions"] == caption
    right = [colours(result["retrieved"][0]["caption"]) == colours(record.captions[0]) for result, record in
             zip(results, records)]  # fmt: skip
    assert sum(right) >= 0.8 * len(records)  # the aligned CLIP finds the image's own colours
    other = captioner(records[0].image, datastore=world["root"] / "dsA", show_retrieved=True)[0]
    assert all(colours(caption) in DOMAIN_A for caption in other.retrieved.captions)  # any datastore serves


def test_the_captioner_and_the_folder_job_take_a_datastore(world, tmp_path) -> None:
    from prefixcap.captioner import Captioner

    records = b_test_records(world)[:4]
    images = [record.image for record in records]
    captioner = Captioner.from_pretrained(world["model"], device="cpu", datastore=world["root"] / "dsB", retrieve_k=1)
    plain = captioner(images)
    shown = captioner(images, show_retrieved=True)
    assert plain == [list(captions) for captions in shown]
    assert all(len(captions.retrieved.captions) == 1 for captions in shown)
    assert not hasattr(plain[0], "retrieved")
    out = tmp_path / "folder"
    assert main(["caption", *images, "--model", str(world["model"]), "--datastore", str(world["root"] / "dsB"),
                 "--retrieve-k", "1", "--show-retrieved", "--output", f"{out}/", "--workers", "0",
                 "--device", "cpu"]) == 0  # fmt: skip
    merged = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [m["captions"] for m in merged] == plain
    assert [[r["caption"] for r in m["retrieved"]] for m in merged] == [list(c.retrieved.captions) for c in shown]


def test_sidecar_captions_follow_a_captioned_folders_datastore(world, tmp_path) -> None:
    records = b_test_records(world)[:3]
    folder = tmp_path / "new"
    folder.mkdir()
    for record in records:
        shutil.copy(record.image, folder / Path(record.image).name)
    assert main(["caption", str(folder), "--sidecar", "--model", str(world["model"]), "--datastore",
                 str(world["root"] / "dsB"), "--workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    from prefixcap.captioner import Captioner

    captioner = Captioner.from_pretrained(world["model"], device="cpu", datastore=world["root"] / "dsB")
    for record in records:
        text = (folder / Path(record.image).name).with_suffix(".txt").read_text().rstrip("\n")
        assert text == captioner(str(folder / Path(record.image).name))[0][0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--show-retrieved"], "--show-retrieved needs --datastore DS"),
        (["--datastore", "DS", "--show-retrieved", "--format", "text"], "add --format jsonl"),
        (["--datastore", "DS", "--prompt", "a photo of"], "drop prompt"),
        (["--datastore", "DS", "--sidecar", "--show-retrieved"], "a sidecar file holds the caption only"),
    ],
)
def test_caption_refuses_what_retrieval_cannot_do(world, capsys, extra, message) -> None:
    image = b_test_records(world)[0].image
    extra = [str(world["root"] / "dsB") if value == "DS" else value for value in extra]
    assert main(["caption", image, "--model", str(world["model"]), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error:")


def test_a_model_without_retrieval_or_with_another_clip_is_refused(world, tiny_model_dir, tiny_components, tmp_path):
    from prefixcap.captioner import Captioner
    from prefixcap.retrieval import build_datastore

    with pytest.raises(UserError, match="trained without retrieval"):
        Captioner.from_pretrained(tiny_model_dir, datastore=world["root"] / "dsB")
    other = build_datastore(world["B"], tmp_path / "other", encoder=tiny_components[0], device="cpu")
    with pytest.raises(UserError) as error:
        Captioner.from_pretrained(world["model"], device="cpu", datastore=other.path)
    assert "\n" not in str(error.value) and "embedded with CLIP" in str(error.value)


def test_the_server_retrieves_and_shows_what_it_retrieved_when_asked(world) -> None:
    import base64

    from fastapi.testclient import TestClient

    from prefixcap.captioner import Captioner
    from prefixcap.serving import ServerConfig, create_app

    records = b_test_records(world)[:2]
    captioner = Captioner.from_pretrained(world["model"], device="cpu", datastore=world["root"] / "dsB")
    images = [base64.b64encode(Path(record.image).read_bytes()).decode() for record in records]
    with TestClient(create_app(captioner, ServerConfig(model_name="tiny"))) as client:
        plain = client.post("/v1/caption", json={"images": images}).json()
        shown = client.post("/v1/caption", json={"images": images, "show_retrieved": True}).json()
    expected = captioner([record.image for record in records], show_retrieved=True)
    assert [[entry["generated_text"] for entry in image] for image in plain] == expected
    assert all("retrieved" not in entry for image in plain for entry in image)
    for image, captions in zip(shown, expected):
        assert [r["caption"] for r in image[0]["retrieved"]] == list(captions.retrieved.captions)


# ---------------------------------------------------------------------- domain transfer
@pytest.fixture(scope="module")
def plain_model(world) -> Path:
    """A model trained on A as the world's one is, but without retrieval."""
    out = world["root"] / "plain"
    assert main(["train", str(world["root"] / "featA"), "--decoder", str(world["gpt2"]), "--out", str(out),
                 *TRAIN]) == 0  # fmt: skip
    return out / "last"


def exact_match(model: Path, records: list, datastore: Path | None = None) -> float:
    """The share of `records` whose image `model` captions exactly as its reference, through the Captioner."""
    from prefixcap.captioner import Captioner

    captioner = Captioner.from_pretrained(model, device="cpu", dtype="float32", datastore=datastore)
    captions = captioner([record.image for record in records])
    return sum(caption[0] == record.captions[0] for caption, record in zip(captions, records)) / len(records)


def test_another_domains_datastore_transfers_the_model_to_that_domain_without_training(world, plain_model) -> None:
    """Held-out exact match on B with B's datastore, against the same model without a datastore or
    with A's, and a model trained without retrieval. Measured (seeds 0 and 1, 30 of B's test images):
    0.93 against 0.0, 0.0 and 0.0; both models caption A's own test images (0.97 and 0.94)."""
    records, root = b_test_records(world), world["root"]
    seen = {caption for record in load_records(world["A"]) for caption in record.captions}
    assert not seen & {record.captions[0] for record in records}  # B's captions: never in training
    a_test = [record for record in load_records(world["A"]) if record.split == "test"]
    assert exact_match(world["model"], a_test, root / "dsA") >= 0.8  # both models learned their domain
    assert exact_match(plain_model, a_test) >= 0.8
    transfer = exact_match(world["model"], records, root / "dsB")
    baselines = {
        "without a datastore": exact_match(world["model"], records),
        "with A's datastore": exact_match(world["model"], records, root / "dsA"),
        "trained without retrieval": exact_match(plain_model, records),
    }
    assert transfer >= 0.8, f"B's datastore: {transfer:.2f} of B's test images captioned exactly"
    for name, score in baselines.items():
        assert transfer - score >= 0.6, f"B's datastore {transfer:.2f}, {name} {score:.2f}"
