"""Self-critical sequence training (`train --objective scst`): the policy gradient's sign and zero,
sampling as generation samples, rewards, exact resume, logs, and SCST beating cross-entropy on
the synthetic `wordings` task."""

from __future__ import annotations

import csv
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixcap import CaptionModel
from prefixcap.cli import main
from prefixcap.errors import UserError
from prefixcap.evaluation.cider import CiderD
from prefixcap.evaluation.clipscore import CLIPScorer, clip_s
from prefixcap.pipeline.features import FeatureStore
from prefixcap.training import TrainConfig
from prefixcap.training.config import MAX_SAMPLES_PER_IMAGE
from prefixcap.training.scst import SCSTLoss, SelfCritical, clip_reward, sampling_seed
from prefixcap.training.state import STATE_DIR, load_training_state
from prefixcap.training.trainer import Trainer
from tests.helpers_pipeline import model_weights, record_steps, synthetic_store

K = 4


@pytest.fixture
def model(tiny_model_dir: Path) -> CaptionModel:
    return CaptionModel.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def features(tiny_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature store of 100 synthetic images (80 train) from the tiny CLIP, as `tiny_model_dir` encodes."""
    return synthetic_store(tmp_path_factory.mktemp("scst"), tiny_components[0], 100)


def sampler(model: CaptionModel, reward, *, baseline: str = "mean", prompts=None, images: int = 6) -> SelfCritical:
    embeds = torch.randn(images, model.config.embed_dim, generator=torch.Generator().manual_seed(0))
    return SelfCritical(
        model, reward, embeds, prompts or [""] * images, samples_per_image=K, baseline=baseline, max_new_tokens=8
    )


def sequence_log_probs(model: CaptionModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows] sum of the log-probabilities of each row's labelled (sampled) tokens."""
    targets = batch["labels"] != -100
    with torch.no_grad():
        logits = SCSTLoss(model).target_logits(batch["image_embeds"], batch["input_ids"], targets).float()
    token = torch.log_softmax(logits, -1).gather(1, batch["labels"][targets][:, None])[:, 0]
    rows = torch.arange(len(targets))[:, None].expand_as(targets)[targets]
    return torch.zeros(len(targets)).index_add(0, rows, token)


def sgd_step(model: CaptionModel, batch: dict[str, torch.Tensor], lr: float) -> torch.Tensor:
    """One plain SGD step on the SCST loss of `batch` (no weight decay, no momentum); the loss."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = SCSTLoss(model)(**batch)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------- the gradient
@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_a_reward_equal_to_the_baseline_changes_nothing(model: CaptionModel, baseline: str) -> None:
    constant = sampler(model, lambda captions, images: np.full(len(captions), 0.7), baseline=baseline)
    batch = constant.batch(np.array([0, 1, 2]), seed=[1, 0, 0])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    assert (batch["advantages"] == 0).all()
    loss = sgd_step(model, batch, lr=10.0)
    assert loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(grad is not None and not grad.any() for grad in grads)  # exactly zero, not just small
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_the_better_rewarded_sample_becomes_more_likely(model: CaptionModel) -> None:
    """The first of each image's samples gets reward 1, the others 0: one step raises its
    log-probability and lowers the others'."""
    first = sampler(model, lambda captions, images: (np.arange(len(captions)) % K == 0).astype(float))
    batch = first.batch(np.array([0, 1]), seed=[2, 0, 0])
    torch.testing.assert_close(batch["advantages"], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3] * 2))  # - mean of others

    before = sequence_log_probs(model, batch)
    sgd_step(model, batch, lr=0.05)
    change = sequence_log_probs(model, batch) - before
    assert (change[::K] > 0).all()
    assert change[::K].mean() > change.reshape(2, K)[:, 1:].mean()


def test_samples_continue_the_prompt_as_generation_does(model: CaptionModel) -> None:
    """Sampled rows are [prompt; caption up to its stop], labelled after the prompt only, and are
    the captions `CaptionModel.generate` samples with the same prompt and seed."""
    texts: list[str] = []
    prompts = ["a photo of", "", "a photo of"]
    scst = sampler(model, lambda captions, images: texts.extend(captions) or np.zeros(len(captions)), prompts=prompts)
    batch = scst.batch(np.array([0, 1, 2]), seed=[5, 1, 0])

    prompt_ids = model.prompt_ids("a photo of")
    eos = model.tokenizer.eos_token_id
    for row in range(3 * K):
        prompt = prompt_ids if prompts[row // K] else []
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
        sampled = [label for label in labels if label != -100]
        assert ids[len(prompt) : len(prompt) + len(sampled)] == sampled
        assert eos not in sampled[:-1] and (sampled[-1] == eos or len(sampled) == 8)  # cut after the stop
    # group 0 is the first distinct prompt, "a photo of": images 0 and 2
    policy = {"do_sample": True, "num_return_sequences": K, "max_new_tokens": 8, "top_k": 0, "top_p": 1.0}
    expected = model.caption(
        image_embeds=scst.embeds[[0, 2]], prompt="a photo of", seed=sampling_seed([5, 1, 0, 0]), **policy
    )
    assert [texts[:K], texts[2 * K :]] == expected


# ---------------------------------------------------------------------- rewards
def test_clipscore_reward_is_clip_s_against_the_stored_embeddings(model: CaptionModel, tiny_components) -> None:
    embeds = torch.randn(2, model.config.embed_dim, generator=torch.Generator().manual_seed(0))
    reward = clip_reward(model, embeds, None)  # the model's own encoder's CLIP, which has a text tower
    captions = ["a red shape", "a dog", "a cat", "two dogs"]

    scorer = CLIPScorer.from_pretrained(str(tiny_components[0]))
    expected = clip_s(embeds[[0, 0, 1, 1]].float(), scorer.embed_texts(captions))
    np.testing.assert_allclose(reward(captions, np.array([0, 1])), expected.numpy(), rtol=1e-5)


def test_clipscore_reward_needs_a_text_tower_and_the_captioners_image_tower(
    model: CaptionModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from prefixcap.testing import build_clip

    embeds = torch.zeros(1, model.config.embed_dim)
    model.config.vision_encoder = str(tiny_model_dir / "vision_encoder")  # the image tower only
    with pytest.raises(UserError, match=r"not a full CLIP with a text tower\); choose one with --reward-clip$"):
        clip_reward(model, embeds, None)
    other = build_clip(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="its image tower is not the captioner's encoder"):
        clip_reward(model, embeds, str(other))


def test_scst_options_are_checked() -> None:
    with pytest.raises(UserError, match="objective scst needs init"):
        TrainConfig(objective="scst")
    with pytest.raises(UserError, match="baseline mean needs samples_per_image >= 2"):
        TrainConfig(objective="scst", init="model", samples_per_image=1)
    with pytest.raises(UserError, match="reward_weights must be two numbers"):
        TrainConfig(reward_weights="1,-2")
    assert TrainConfig(reward_weights="1,2.5").reward_weight_pair == (1.0, 2.5)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("samples_per_image", str(MAX_SAMPLES_PER_IMAGE + 1), f"1, {MAX_SAMPLES_PER_IMAGE}], got"),
        ("samples_per_image", "100000", f"1, {MAX_SAMPLES_PER_IMAGE}], got"),
        ("reward_weights", "0,0", "reward_weights must not both be 0"),
        ("reward_weights", "0,-0.0", "reward_weights must not both be 0"),
    ],
)
def test_scst_bounds_are_refused(flag: str, value: str, message: str, tmp_path: Path, capsys) -> None:
    """An unbounded sample count, and a reward that is zero whatever the captions."""
    typed = int(value) if flag == "samples_per_image" else value
    with pytest.raises(UserError, match=message):
        TrainConfig(objective="scst", init="model", reward="cider+clipscore", **{flag: typed})
    command = ["train", "features", "--out", str(tmp_path / "run"), "--init", "model", "--objective", "scst",
               "--reward", "cider+clipscore", f"--{flag.replace('_', '-')}", value]  # fmt: skip
    try:
        status = main(command)
    except SystemExit as exit:  # argparse's own range check
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_mean_baseline_grows_with_b_times_k_not_k_squared(model: CaptionModel) -> None:
    """The mean of the other samples is (sum - own) / (k - 1), never a B x k x k
    array. tracemalloc (NumPy reports its buffers to it) measures the peak between the rewards'
    return and the loss inputs' start: a [B, k, k] float64 array alone is B * k * k * 8 bytes."""
    images, k = 4, MAX_SAMPLES_PER_IMAGE
    embeds = torch.randn(images, model.config.embed_dim, generator=torch.Generator().manual_seed(0))
    rewards = np.random.default_rng(0).random(images * k)
    result = rewards.copy()
    peaks = []

    def reward(captions, indices):
        tracemalloc.reset_peak()
        peaks.append(-tracemalloc.get_traced_memory()[0])
        return result

    class Measured(SelfCritical):
        def _inputs(self, *args):
            peaks[0] += tracemalloc.get_traced_memory()[1]
            return super()._inputs(*args)

    scst = Measured(model, reward, embeds, [""] * images, samples_per_image=k, max_new_tokens=2)
    tracemalloc.start()
    try:
        batch = scst.batch(np.arange(images), seed=[0, 0, 0])
    finally:
        tracemalloc.stop()
    grid = rewards.reshape(images, k)
    expected = grid - (grid.sum(1, keepdims=True) - grid) / (k - 1)
    torch.testing.assert_close(batch["advantages"], torch.from_numpy(expected.reshape(-1)).float())
    assert peaks[0] < images * k * k * 8 / 10, peaks


# ---------------------------------------------------------------------- runs
def scst_run(features: Path, out: Path, init: Path, **options) -> TrainConfig:
    values = {"features": str(features), "out": str(out), "init": str(init), "objective": "scst", "epochs": 2,
              "batch_size": 8, "lr": 1e-3, "val_images": 5, "seed": 3, "samples_per_image": 3, **options}  # fmt: skip
    return TrainConfig(**values)


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resumed_scst_run_equals_the_uninterrupted_one_and_logs_the_reward(
    tmp_path: Path, features: Path, image_dependent_model_dir: Path, one_thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints every 7 steps (10 per epoch); the first run stops right after the one at step 7,
    mid-epoch, so the resumed run must sample the same captions from there on. The --init model
    names colours, so its samples share words with the references and earn a reward above 0."""
    init_dir = image_dependent_model_dir
    options = {"save_every": 7}
    Trainer(scst_run(features, tmp_path / "straight", init_dir, **options)).fit()

    checkpoint = Trainer._checkpoint

    def stop_after_first(self: Trainer, *, best: bool) -> None:
        checkpoint(self, best=best)
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_checkpoint", stop_after_first)
        with pytest.raises(Interrupted):
            Trainer(scst_run(features, tmp_path / "stopped", init_dir, **options)).fit()
    assert load_training_state(tmp_path / "stopped" / "last" / STATE_DIR).progress.step == 7
    resumed_run = Trainer(scst_run(features, tmp_path / "stopped", init_dir, **options), resume=True)
    steps = record_steps(monkeypatch, resumed_run)
    resumed_run.fit()
    assert steps == list(range(7, 20))  # from the checkpoint's step on, not from 0

    resumed, straight = model_weights(tmp_path / "stopped" / "last"), model_weights(tmp_path / "straight" / "last")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[name], straight[name]) for name in straight)
    init = model_weights(init_dir)
    assert init.keys() == straight.keys() and not all(torch.equal(init[name], straight[name]) for name in init)
    rows = [list(csv.DictReader((tmp_path / run / "metrics.csv").open())) for run in ("stopped", "straight")]
    timing = ("reward_share", "sample_share")  # wall-clock shares differ from run to run
    assert [{k: v for k, v in row.items() if k not in timing} for row in rows[0]] == [
        {k: v for k, v in row.items() if k not in timing} for row in rows[1]
    ]
    for row in rows[1]:  # the reward, its baseline and the reward's share of the step time, per epoch
        assert float(row["reward"]) > 0 and abs(float(row["baseline"]) - float(row["reward"])) < 1e-9
        assert 0 < float(row["reward_share"]) < 1 and 0 < float(row["sample_share"]) < 1
    assert (tmp_path / "straight" / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert CaptionModel.from_pretrained(tmp_path / "straight" / "best").config.prefix_length == 4


def test_cider_plus_clipscore_run_with_the_greedy_baseline(
    tmp_path: Path, features: Path, tiny_model_dir: Path
) -> None:
    """The model's own encoder is a full CLIP: the mixed reward needs no --reward-clip."""
    config = scst_run(features, tmp_path / "run", tiny_model_dir, epochs=1, batch_size=40, val_images=2,
                      reward="cider+clipscore", reward_weights="1,2", baseline="greedy")  # fmt: skip
    Trainer(config).fit()

    (row,) = csv.DictReader((tmp_path / "run" / "metrics.csv").open())
    assert float(row["baseline"]) != float(row["reward"])  # the greedy captions' reward, not the samples' mean
    assert 0 < float(row["reward_share"]) < 1


def test_an_init_model_trained_with_a_prompt_samples_after_it(
    tmp_path: Path, features: Path, tiny_model_dir: Path
) -> None:
    prompted = CaptionModel.from_pretrained(tiny_model_dir)
    prompted.config.prompt = "a photo of"
    prompted.save_pretrained(tmp_path / "prompted")

    trainer = Trainer(scst_run(features, tmp_path / "run", tmp_path / "prompted"))
    assert trainer.config.prompt == "a photo of" and set(trainer.scst.prompts) == {"a photo of"}
    assert trainer.model.config.prompt == "a photo of"  # and it still captions after it


@pytest.mark.slow
def test_scst_on_the_wordings_task_raises_held_out_cider(tmp_path: Path, one_thread) -> None:
    """synth --task wordings -> prepare -> train (cross-entropy) -> train --objective scst: greedy
    captions of the cross-entropy model often take the short wording, which leaves out the
    background; SCST learns the consensus, and held-out (test split) CIDEr-D rises."""
    from prefixcap.cli import main
    from prefixcap.testing import build_learnable_components

    clip, gpt2 = build_learnable_components(tmp_path / "models")
    features = str(tmp_path / "features")
    assert (
        main(["synth", str(tmp_path / "data"), "--task", "wordings", "--num-images", "600", "--image-size", "32"]) == 0
    )
    assert main(["prepare", str(tmp_path / "data" / "captions.jsonl"), "--out", features,
                 "--vision-encoder", str(clip), "--workers", "0"]) == 0  # fmt: skip
    common = ["--val-images", "60", "--seed", "0"]  # 60 val and 60 test images: 30 were too few to rank epochs
    assert main(["train", features, "--decoder", str(gpt2), "--out", str(tmp_path / "xent"), "--prefix-length", "4",
                 "--epochs", "8", "--batch-size", "32", "--lr", "3e-3", *common]) == 0  # fmt: skip
    assert main(["train", features, "--init", str(tmp_path / "xent" / "best"), "--objective", "scst",
                 "--out", str(tmp_path / "scst"), "--epochs", "5", "--batch-size", "16", "--lr", "1e-3",
                 *common]) == 0  # fmt: skip

    before, short_before = held_out_cider(tmp_path / "xent" / "best", features)
    after, short_after = held_out_cider(tmp_path / "scst" / "best", features)
    assert after > before + 30, (before, after)
    assert short_after < short_before


def held_out_cider(model_dir: Path, features: str) -> tuple[float, int]:
    """Corpus CIDEr-D (x100) of greedy captions of the test split, and how many leave out the background."""
    from prefixcap.evaluation import coco_scores

    store = FeatureStore(features)
    records = store.records("test")
    captions = CaptionModel.from_pretrained(model_dir).caption(image_embeds=store.embeddings("test"))
    predictions = {record.image_id: per_image[0] for record, per_image in zip(records, captions)}
    references = {record.image_id: list(record.captions) for record in records}
    cider = coco_scores(predictions, references, java=False, metrics=("cider",)).corpus["CIDEr"]
    return cider, sum("background" not in caption for caption in predictions.values())


def test_cider_reward_uses_training_document_frequencies() -> None:
    """The trainer's CIDEr-D reward is `CiderD` over every training image's references (a check
    that the reward built for a run scores a caption as CiderD does)."""
    from prefixcap.data import CaptionRecord
    from prefixcap.training.scst import build_reward

    records = [CaptionRecord(str(i), f"{i}.png", refs, "train") for i, refs in
               enumerate([("a red shape", "a red thing"), ("a blue shape on white",), ("a dog",)])]  # fmt: skip
    reward = build_reward(TrainConfig(), None, records, torch.zeros(3, 2))  # type: ignore[arg-type]
    cider = CiderD([list(record.captions) for record in records])
    expected = cider(["a red shape", "a dog"], [records[0].captions, records[2].captions])
    np.testing.assert_allclose(reward(["a red shape", "a dog"], np.array([0, 2])), expected)


def test_pooled_cider_reward_equals_the_in_process_one() -> None:
    """CIDEr-D over chunks of the images in two forked workers: the same rewards, in order."""
    from prefixcap.training.scst import CiderReward, PooledReward

    references = [[f"a {colour} shape on a {ground} background", f"a {colour} thing"]
                  for colour in ("red", "blue", "green") for ground in ("white", "black")]  # fmt: skip
    reward = CiderReward(CiderD(references), references)
    images = np.array([5, 0, 3, 3, 1])
    captions = [f"a {word} shape" for word in ("red", "blue", "green", "white", "thing")] * 2  # k = 2
    pooled = PooledReward(reward, workers=2)

    np.testing.assert_array_equal(pooled(captions, images), reward(captions, images))
    assert pooled._pool is not None  # it did run in the workers
