"""`prefixcap train`: targets and masking, options, exact state round trips, freezing, and end to
end: learnability, SIGKILL + --resume, and two-process training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixcap import CaptionModel
from prefixcap.data import CaptionRecord
from prefixcap.errors import UserError
from prefixcap.model.config import CaptionConfig
from prefixcap.testing import colour_captions
from prefixcap.training import TrainConfig, resolve_config
from prefixcap.training.data import CaptionTargets, process_batches
from prefixcap.training.objective import CaptionLoss
from prefixcap.training.state import (
    JSON_FILE,
    STATE_DIR,
    TENSORS_FILE,
    Progress,
    capture_rng,
    from_storable,
    load_training_state,
    restore_rng,
    save_training_state,
    to_storable,
)
from prefixcap.training.step import build_scheduler, freeze_first_blocks, train_step
from prefixcap.training.trainer import Trainer
from tests.helpers_pipeline import (
    kill_when,
    model_weights,
    record_steps,
    run_prefixcap,
    synthetic_store,
)


@pytest.fixture(scope="module")
def synth_features(tiny_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature store of 100 synthetic images (80 train, 10 val, 10 test) from the tiny CLIP."""
    return synthetic_store(tmp_path_factory.mktemp("synth"), tiny_components[0], 100)


@pytest.fixture(scope="module")
def tiny_model(tiny_components) -> CaptionModel:
    torch.manual_seed(0)
    return CaptionModel.from_components(*tiny_components, mapper="mlp", prefix_length=3)


# ---------------------------------------------------------------------- targets and masking
def test_targets_end_with_eos_and_padding_is_masked(tiny_model: CaptionModel) -> None:
    tokenizer = tiny_model.tokenizer
    records = [
        CaptionRecord("a", "a.png", ("a red shape", "a man riding a horse on a beach"), "train"),
        CaptionRecord("b", "b.png", ("two dogs",), "train"),
    ]
    targets = CaptionTargets.build(records, torch.randn(2, 24), tokenizer, max_tokens=6)

    batch = targets.batch(np.arange(3))
    ids = [
        tokenizer(c, add_special_tokens=False)["input_ids"]
        for c in ("a red shape", "a man riding a horse on a beach", "two dogs")
    ]
    eos = tokenizer.eos_token_id
    assert len(ids[0]) + 1 <= 6 < len(ids[1]) + 1 and len(ids[2]) + 1 < len(ids[0]) + 1
    width = 6  # the longest target in the batch: the cut caption
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["input_ids"][0, : len(ids[0]) + 1].tolist() == ids[0] + [eos]  # ends with EOS...
    assert batch["input_ids"][1].tolist() == ids[1][:6]  # ...unless cut: no EOS mid-sentence
    assert batch["attention_mask"].sum(1).tolist() == [len(ids[0]) + 1, 6, len(ids[2]) + 1]
    assert (batch["labels"] == torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)).all()
    assert batch["labels"][2, len(ids[2])].item() == eos and (batch["labels"][2, len(ids[2]) + 1 :] == -100).all()
    torch.testing.assert_close(batch["image_embeds"], targets.embeds[[0, 0, 1]])
    assert targets.num_cut == 1
    assert targets.batch(np.array([2]))["input_ids"].shape[1] == len(ids[2]) + 1  # padded to its own batch only


def test_default_length_fits_99_percent_of_captions(tiny_model: CaptionModel) -> None:
    token_ids = [[5] * (n % 10) for n in range(200)] + [[5] * 40]  # lengths 0..9, and one outlier
    targets = CaptionTargets.from_token_ids(
        token_ids, np.arange(201), torch.zeros(201, 4), eos_token_id=0, pad_token_id=0
    )

    assert targets.max_tokens == 10 and targets.num_cut == 1


def test_loss_counts_caption_tokens_and_eos_only(tiny_model: CaptionModel) -> None:
    records = [
        CaptionRecord(str(i), f"{i}.png", (caption,), "train")
        for i, caption in enumerate(["a red shape on a blue background", "two dogs"])
    ]
    targets = CaptionTargets.build(records, torch.randn(2, 24), tiny_model.tokenizer)
    batch = targets.batch(np.arange(2))
    tiny_model.eval()

    with torch.no_grad():
        output = tiny_model(**batch)
        training_loss = CaptionLoss(tiny_model)(**batch)
        noisy = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
        changed_padding = CaptionLoss(tiny_model)(**noisy)

    # Logits at position K-1+t predict target token t; the prefix and the padding predict nothing.
    k = tiny_model.config.prefix_length
    logits = output.logits[:, k - 1 : -1]
    mask = batch["attention_mask"].bool()
    expected = torch.nn.functional.cross_entropy(logits[mask], batch["input_ids"][mask])
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(training_loss, expected)  # the lean training objective: the same loss
    torch.testing.assert_close(changed_padding, expected)  # padding ids do not matter
    # the objective swapped GPT-2's eight-kernel gelu_new for the equal one-kernel GELU
    activations = {type(module).__name__ for module in tiny_model.decoder.modules() if "GELU" in type(module).__name__}
    assert activations == {"GELUTanh"}


def test_epoch_orders_follow_seed_and_epoch_and_split_evenly() -> None:
    targets = CaptionTargets.from_token_ids([[1]] * 7, np.array([0, 0, 0, 1, 2, 2, 3]), torch.zeros(4, 2), 0, 0)

    everything = targets.epoch_order("all", seed=1, epoch=0)
    assert sorted(everything) == list(range(7))
    assert (targets.epoch_order("all", 1, 0) == everything).all() and (
        targets.epoch_order("all", 1, 1) != everything
    ).any()
    one = targets.epoch_order("one", seed=1, epoch=0)
    assert sorted(targets.image_of[one]) == [0, 1, 2, 3]  # one caption of each image
    shares = [np.concatenate(process_batches(everything, 2, rank, 2)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4  # padded to equal shares: no process waits
    assert set(np.concatenate(shares)) == set(range(7))


# ---------------------------------------------------------------------- options
def test_config_file_fills_options_and_flags_win(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("lr: 1e-4\nbatch-size: 64\nfreeze: first:10\nmapper: linear\n")

    config, given = resolve_config({"batch_size": 32, "epochs": None}, tmp_path / "run.yaml")

    assert (config.lr, config.batch_size, config.freeze, config.mapper, config.epochs) == (
        1e-4,
        32,
        "first:10",
        "linear",
        10,
    )
    assert config.frozen_blocks == 10
    assert given == {"lr": 1e-4, "batch_size": 32, "freeze": "first:10", "mapper": "linear"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: fast\n", "lr must be a number"),
        ("batch_size: 1.5\n", "batch_size must be an integer"),
        ("learning_rate: 1\n", "unknown option 'learning_rate'"),
        ("- 1\n", "must hold a mapping"),
        ("freeze: some\n", "freeze must be frozen, none, lora or first:N"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)

    with pytest.raises(UserError, match=message):
        resolve_config({}, tmp_path / "bad.yaml")


def test_an_unknown_config_key_lists_the_options_as_the_readme_writes_them(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("learning-rate: 1\n")
    with pytest.raises(UserError) as error:
        resolve_config({}, tmp_path / "bad.yaml")
    valid = str(error.value).split("valid: ")[1].split(", ")
    assert "batch-size" in valid and "prefix-length" in valid and "lr" in valid
    assert not [name for name in valid if "_" in name]


# ---------------------------------------------------------------------- state and freezing
def test_optimizer_and_rng_state_survive_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(
        [{"params": [model[0].weight]}, {"params": [model[0].bias, *model[1].parameters()], "weight_decay": 0.0}]
    )
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    tensors: dict[str, torch.Tensor] = {}
    document = json.loads(
        json.dumps(to_storable({"optimizer": optimizer.state_dict(), "rng": capture_rng()}, tensors, ""))
    )
    expected_draw = torch.rand(3)  # the next draw after the capture
    save_file(tensors, tmp_path / "state.safetensors")
    restored = from_storable(document, load_file(tmp_path / "state.safetensors"))

    twin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(
        [{"params": [twin[0].weight]}, {"params": [twin[0].bias, *twin[1].parameters()], "weight_decay": 0.0}]
    )
    twin_optimizer.load_state_dict(restored["optimizer"])
    restore_rng(restored["rng"])
    assert torch.equal(torch.rand(3), expected_draw)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        net(torch.ones(2, 4)).sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_progress_keeps_the_json_layout_of_earlier_runs(tmp_path: Path) -> None:
    """A run checkpointed while the progress was a plain dict resumes, and is written back the same."""
    from safetensors.torch import save_file

    history = [{"epoch": 1, "step": 10, "train_loss": 3.5, "lr": 0.001, "val_loss": 3.25}]
    progress = {"epoch": 1, "epoch_step": 3, "step": 13, "loss_sum": 9.0, "loss_steps": 3, "best": 0.5,
                "best_epoch": 1, "history": history}  # fmt: skip
    document = {"optimizer": {}, "scheduler": {}, "scaler": None, "rng": [], "progress": progress, "config": {},
                "store": None}  # fmt: skip
    (tmp_path / JSON_FILE).write_text(json.dumps(document))
    save_file({}, tmp_path / TENSORS_FILE)

    state = load_training_state(tmp_path)
    assert state.progress == Progress(epoch=1, epoch_step=3, step=13, loss_sum=9.0, loss_steps=3, best=0.5,
                                      best_epoch=1, history=history)  # fmt: skip
    save_training_state(tmp_path / "again", state)
    assert json.loads((tmp_path / "again" / JSON_FILE).read_text()) == document


def test_freeze_modes(tiny_components) -> None:
    frozen = CaptionModel.from_components(*tiny_components, prefix_length=2, freeze_decoder=True)
    partly = CaptionModel.from_components(*tiny_components, prefix_length=2)
    freeze_first_blocks(partly.decoder, 1)

    assert {name.split(".")[0] for name, p in frozen.named_parameters() if p.requires_grad} == {"mapper"}
    trainable = {name for name, p in partly.decoder.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("transformer.h.1.", "transformer.ln_f.")) for name in trainable)
    with pytest.raises(UserError, match="only 2 blocks"):
        freeze_first_blocks(partly.decoder, 3)


# ---------------------------------------------------------------------- optimizer steps and schedules
def colour_targets(model: CaptionModel) -> CaptionTargets:
    """Four captions of equal token length, so that two micro-batches of two weigh their tokens as
    one batch of four does."""
    records = [CaptionRecord(str(i), f"{i}.png", (text,), "train") for i, text in enumerate(colour_captions().values())]
    embeds = torch.randn(len(records), model.config.embed_dim, generator=torch.Generator().manual_seed(0))
    targets = CaptionTargets.build(records[:4], embeds[:4], model.tokenizer)
    assert len(set(targets.lengths.tolist())) == 1  # the precondition
    return targets


def weights_after_one_step(tiny_components, micro_batches: list[list[int]], max_grad_norm: float = 0.0):
    """(weights before, weights after) one SGD step of `train_step` over these micro-batches."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = CaptionModel.from_components(*tiny_components, mapper="mlp", prefix_length=3).eval()  # no dropout
    targets = colour_targets(model)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [targets.batch(np.array(indices)) for indices in micro_batches]
    train_step(CaptionLoss(model), optimizer, scheduler, Accelerator(cpu=True), batches, max_grad_norm)
    return before, {name: p.detach().clone() for name, p in trainable.items()}


def test_grad_accum_equals_one_larger_batch(tiny_components, one_thread) -> None:
    before, accumulated = weights_after_one_step(tiny_components, [[0, 1], [2, 3]])
    _, whole = weights_after_one_step(tiny_components, [[0, 1, 2, 3]])
    assert any(not torch.equal(before[name], whole[name]) for name in whole)  # the step moved the weights
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6)


def test_max_grad_norm_clips_the_step(tiny_components, one_thread) -> None:
    def step_norm(max_grad_norm: float) -> float:
        before, after = weights_after_one_step(tiny_components, [[0, 1, 2, 3]], max_grad_norm)
        return torch.sqrt(sum(((after[name] - before[name]) ** 2).sum() for name in after)).item()

    assert step_norm(0.0) > 0.5 * 1e-2  # unclipped: lr x a gradient norm above the cap below
    assert step_norm(1e-2) == pytest.approx(0.5 * 1e-2, rel=1e-3)  # lr x the cap


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedules_warm_up_then_decay_as_named(schedule: str) -> None:
    import math

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainConfig(lr=1.0, warmup=0.2, lr_schedule=schedule), total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    decay = {"linear": lambda x: 1 - x, "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x))}[schedule]
    expected = [step / 2 for step in range(2)] + [decay((step - 2) / 8) for step in range(2, 10)]
    assert rates == pytest.approx(expected)


def test_one_caption_per_image_draws_each_image_once_per_epoch(tiny_model: CaptionModel) -> None:
    records = [
        CaptionRecord(str(i), f"{i}.png", tuple(f"caption {i} {j}" for j in range(3)), "train") for i in range(6)
    ]
    targets = CaptionTargets.build(records, torch.randn(6, 24), tiny_model.tokenizer)
    assert len(targets.epoch_order("all", seed=0, epoch=0)) == 18
    seen = set()
    for epoch in range(8):
        order = targets.epoch_order("one", seed=0, epoch=epoch)
        assert sorted(targets.image_of[order].tolist()) == list(range(6))  # every image once
        seen.update(order.tolist())
    assert len(seen) > 6  # a different caption of some image in another epoch


# ---------------------------------------------------------------------- runs
def small_run(features: Path, out: Path, decoder: Path, **options) -> TrainConfig:
    values = {"features": str(features), "out": str(out), "decoder": str(decoder), "prefix_length": 4,
              "epochs": 2, "batch_size": 8, "lr": 1e-3, "val_images": 5, "seed": 3, **options}  # fmt: skip
    return TrainConfig(**values)


def test_run_writes_checkpoints_logs_and_refuses_to_overwrite(
    tmp_path: Path, synth_features: Path, tiny_components, one_thread, capsys, monkeypatch
) -> None:
    config = small_run(synth_features, tmp_path / "run", tiny_components[1])
    Trainer(config).fit()
    # the epoch lines in fixed point (an untrained model's BLEU-4 read 3.041e-18)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    number = r"-?\d+\.\d{4}"
    expected = rf"epoch [12]/2: train_loss {number}, val_loss {number}, BLEU-4 {number}, CIDEr {number}"
    assert len(lines) == 2 and all(re.fullmatch(expected, line) for line in lines), lines

    run = tmp_path / "run"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["epoch", "step", "train_loss", "lr", "val_loss", "BLEU-4", "CIDEr"] and len(rows) == 3
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG") and list((run / "tensorboard").iterdir())
    assert CaptionModel.from_pretrained(run / "best").config.prefix_length == 4
    state = load_training_state(run / "last" / STATE_DIR)
    assert state.progress.epoch == 2 and state.config["max_caption_tokens"] is not None and len(state.rng) == 1
    assert not list(run.glob(".*"))  # no staging folders left
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        Trainer(config)
    with pytest.raises(UserError, match="--lr 0.1 differs from the resumed run's 0.001"):
        Trainer(config, resume=True, given={"lr": 0.1})
    finished = Trainer(TrainConfig(out=str(run)), resume=True)  # options from the run; nothing left
    steps = record_steps(monkeypatch, finished)
    assert finished.fit().step == 20 and steps == []


def test_checkpoints_keep_what_the_user_put_in_best_and_last(
    tmp_path: Path, synth_features: Path, tiny_components, one_thread
) -> None:
    """Re-saving RUN/best deleted an `evaluate --out RUN/best/eval` folder mid-run.
    Checkpoints replace the model's own entries and keep everything else."""
    run = tmp_path / "run"
    trainer = Trainer(small_run(synth_features, run, tiny_components[1]))
    checkpoint, saves = trainer._checkpoint, []

    def checkpoint_and_add_files(*, best: bool) -> None:
        checkpoint(best=True)  # every epoch re-saves best/, as an improving run does
        if not saves:  # after the first checkpoint, as a user evaluating it would
            (run / "best" / "eval").mkdir()
            (run / "best" / "eval" / "results.json").write_text("[]")
            (run / "last" / "NOTES.md").write_text("notes")
        saves.append(trainer.progress.epoch)

    trainer._checkpoint = checkpoint_and_add_files
    trainer.fit()
    assert saves == [1, 2]
    assert (run / "best" / "eval" / "results.json").read_text() == "[]" and (run / "last" / "NOTES.md").is_file()
    best, last = model_weights(run / "best"), model_weights(run / "last")  # both written by the last checkpoint
    assert best.keys() == last.keys() and all(torch.equal(best[name], last[name]) for name in best)
    assert load_training_state(run / "last" / STATE_DIR).progress.epoch == 2
    assert not list(run.glob(".*"))  # no staging or old copies left
    with pytest.raises(UserError, match="best: holds eval, which the run did not write; --overwrite would delete"):
        Trainer(small_run(synth_features, run, tiny_components[1]), overwrite=True)
    assert (run / "best" / "eval" / "results.json").is_file() and (run / "last" / "NOTES.md").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(
    tmp_path: Path, synth_features: Path, tiny_components, one_thread, monkeypatch
) -> None:
    """Checkpoints every 7 steps (10 steps per epoch): the kill lands mid-epoch, so the resumed
    run must restore optimizer, scheduler, RNG (the tiny GPT-2 has dropout) and the data position."""
    options = {"epochs": 3, "save_every": 7}
    killed = small_run(synth_features, tmp_path / "killed", tiny_components[1], **options)
    args = ["train", synth_features, "--out", killed.out, "--decoder", killed.decoder, "--prefix-length", "4",
            "--epochs", "3", "--batch-size", "8", "--lr", "1e-3", "--val-images", "5", "--seed", "3",
            "--save-every", "7"]  # fmt: skip

    kill_when(args, ready=lambda: (tmp_path / "killed" / "last" / STATE_DIR / "state.json").exists())
    checkpoint = load_training_state(tmp_path / "killed" / "last" / STATE_DIR).progress.step
    assert 0 < checkpoint < 30
    resumed_run = Trainer(killed, resume=True, given={"epochs": 3, "seed": 3})
    with monkeypatch.context() as patch:
        steps = record_steps(patch, resumed_run)
        resumed_run.fit()
    assert steps == list(range(checkpoint, 30))  # from the checkpoint's step on, not from 0
    Trainer(small_run(synth_features, tmp_path / "straight", tiny_components[1], **options)).fit()

    resumed, straight = model_weights(tmp_path / "killed" / "last"), model_weights(tmp_path / "straight" / "last")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    histories = [
        load_training_state(tmp_path / run / "last" / STATE_DIR).progress.history for run in ("killed", "straight")
    ]
    assert len(histories[0]) == len(histories[1]) == 3
    assert histories[0] == histories[1]  # losses and metrics too


@pytest.mark.slow
def test_two_processes_train_and_write_one_checkpoint(tmp_path: Path, synth_features: Path, tiny_components) -> None:
    result = run_prefixcap(
        "train", synth_features, "--decoder", tiny_components[1], "--out", tmp_path / "run", "--prefix-length", "4",
        "--epochs", "2", "--batch-size", "8", "--val-images", "5", processes=2,
    )  # fmt: skip

    assert result.stderr.count("epoch 2/2:") == 1  # only the main process reports
    assert "5 steps per epoch of 16 captions (8 x 2 processes" in result.stderr
    state = load_training_state(tmp_path / "run" / "last" / STATE_DIR)
    assert state.progress.step == 10 and len(state.rng) == 2
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [
        "best",
        "curves.png",
        "last",
        "metrics.csv",
        "tensorboard",
    ]
    CaptionModel.from_pretrained(tmp_path / "run" / "last")


def test_the_mapper_sizes_are_the_model_configs_and_their_earlier_names_still_read(tmp_path: Path) -> None:
    """A run's model options are the model config's fields, by its names; config files and runs
    stored before may still say mapper_layers and mapper_heads."""
    path = tmp_path / "run.yaml"
    path.write_text("mapper: transformer\nmapper-layers: 3\nmapper_heads: 2\nmapper-width: 16\n")
    config, _ = resolve_config({}, path)
    assert (config.mapper_num_layers, config.mapper_num_heads, config.mapper_width) == (3, 2, 16)
    model = CaptionConfig(**config.model_options)
    assert (model.mapper, model.mapper_num_layers, model.mapper_num_heads, model.mapper_width) == (
        "transformer",
        3,
        2,
        16,
    )
    stored = {
        ("mapper_layers" if name == "mapper_num_layers" else name): value for name, value in config.to_dict().items()
    }
    assert TrainConfig.from_stored(stored) == config
