"""LoRA fine-tuning of the decoder (`train --freeze lora`, prefixcap.model.lora): which parameters train,
the adapter-only model directory and its merged reload, exact resume, the decoding engine on an
unmerged adapter, and the missing-PEFT message; plus `--freeze first:N` on a Llama decoder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from prefixcap import CaptionModel
from prefixcap.errors import UserError
from prefixcap.model.config import CONFIG_NAME, CaptionConfig
from prefixcap.model.lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, default_targets, has_adapter
from prefixcap.system.extras import MissingExtraError
from prefixcap.testing import build_decoder, build_tokenizer
from prefixcap.training import TrainConfig
from prefixcap.training import trainer as trainer_module
from prefixcap.training.state import STATE_DIR, load_training_state
from prefixcap.training.step import apply_freeze_policy
from prefixcap.training.trainer import Trainer
from tests.helpers_engine import hf_generate_only, supported
from tests.helpers_pipeline import record_steps, synthetic_store

pytest.importorskip("peft")

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def lora_features(tiny_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature store of 60 synthetic images (48 train, 6 val, 6 test) from the tiny CLIP."""
    return synthetic_store(tmp_path_factory.mktemp("lora_synth"), tiny_components[0], 60)


@pytest.fixture(scope="module")
def base_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 large enough for the adapter's size to mean something (128 wide, 4 blocks: 0.8M
    parameters) and still tiny."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("base_gpt2")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(out)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=4, n_head=4, n_positions=96)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LlamaForCausalLM with an untied LM head."""
    return build_decoder(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def lora_model_dir(tiny_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved model with a (randomly set) LoRA adapter on the tiny GPT-2."""
    model = lora_model(*tiny_components, rank=4)
    directory = tmp_path_factory.mktemp("lora_model") / "model"
    model.save_pretrained(directory)
    return directory


def lora_model(clip: Path, decoder: Path, rank: int = 4, **freeze) -> CaptionModel:
    """A new model with LoRA on its decoder, and the adapters' B set at random (fresh adapters
    start at B = 0, where they change nothing)."""
    torch.manual_seed(0)
    model = CaptionModel.from_components(clip, decoder, prefix_length=4)
    apply_freeze_policy(model, TrainConfig(freeze="lora", lora_rank=rank, **freeze))
    with torch.no_grad():
        for name, parameter in model.decoder.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    return model.eval()


def trainable(module: nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in module.named_parameters() if p.requires_grad}


def expected_lora_parameters(decoder: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """r x (fan_in + fan_out) per adapted layer, read from the base layers' shapes."""
    total = 0
    for name, module in decoder.named_modules():
        if name.rpartition(".")[2] in targets and hasattr(module, "base_layer"):
            in_out = module.base_layer.weight.shape  # Linear [out, in], GPT-2's Conv1D [in, out]: the sum is the same
            total += rank * sum(in_out)
    return total


def run_config(features: Path, out: Path, decoder: Path, **options) -> TrainConfig:
    values = {"features": str(features), "out": str(out), "decoder": str(decoder), "prefix_length": 4,
              "mapper": "linear", "epochs": 2, "batch_size": 8, "lr": 1e-3, "val_images": 3, "seed": 3,
              "freeze": "lora", "lora_rank": 4, **options}  # fmt: skip
    return TrainConfig(**values)


def lora_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a LoRA model directory: mapper and adapter."""
    weights = {f"mapper.{k}": v for k, v in load_file(model_dir / "mapper.safetensors").items()}
    weights.update({f"adapter.{k}": v for k, v in load_file(model_dir / ADAPTER_DIR / ADAPTER_WEIGHTS).items()})
    return weights


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


# ---------------------------------------------------------------------- what trains
def test_lora_trains_the_mapper_and_the_adapters_only(tiny_components) -> None:
    torch.manual_seed(0)
    model = CaptionModel.from_components(*tiny_components, prefix_length=4)
    before = model.decoder(input_ids=torch.tensor([[1, 2, 3]])).logits
    apply_freeze_policy(model, TrainConfig(freeze="lora", lora_rank=4))

    names = trainable(model)
    adapters = {name: count for name, count in names.items() if name.startswith("decoder.")}
    assert all(".lora_A." in name or ".lora_B." in name for name in adapters)
    assert {name.split(".")[-4] for name in adapters} >= {"c_attn", "c_fc"}
    assert sum(adapters.values()) == expected_lora_parameters(model.decoder, ("c_attn", "c_proj", "c_fc"), 4) > 0
    assert sum(names.values()) == sum(adapters.values()) + sum(p.numel() for p in model.mapper.parameters())
    assert type(model.decoder).__name__ == "GPT2LMHeadModel" and has_adapter(model.decoder)
    # B starts at zero: the decoder computes what it did (GPT-2's Conv1D layers need fan_in_fan_out)
    torch.testing.assert_close(model.decoder(input_ids=torch.tensor([[1, 2, 3]])).logits, before)


def test_lora_on_a_llama_decoder_adapts_every_block_linear(tiny_components, llama_dir: Path) -> None:
    model = lora_model(tiny_components[0], llama_dir, rank=2, lora_alpha=8)
    adapters = {name for name in trainable(model.decoder)}
    assert {name.split(".")[-4] for name in adapters} == set(LLAMA_TARGETS)
    assert sum(trainable(model.decoder).values()) == expected_lora_parameters(model.decoder, LLAMA_TARGETS, 2)
    assert model.decoder.peft_config["default"].lora_alpha == 8 and not model.decoder.lm_head.weight.requires_grad


def test_lora_targets_defaults_and_mistakes(tiny_components) -> None:
    assert TrainConfig(freeze="lora").lora_scale_alpha == 32  # 2 x the default rank 16
    assert TrainConfig(freeze="lora", lora_targets="c_attn,c_fc").lora_target_names == ("c_attn", "c_fc")
    with pytest.raises(UserError, match="lora_targets must be comma-separated module names"):
        TrainConfig(freeze="lora", lora_targets="c_attn,,c_fc")
    with pytest.raises(UserError, match="lora_alpha must be > 0"):
        TrainConfig(freeze="lora", lora_alpha=0)
    with pytest.raises(UserError, match="freeze must be frozen, none, lora or first:N"):
        TrainConfig(freeze="adapters")

    model = CaptionModel.from_components(*tiny_components, prefix_length=4)
    with pytest.raises(UserError, match="has no module named q_proj; its leaf modules include"):
        apply_freeze_policy(model, TrainConfig(freeze="lora", lora_targets="c_attn,q_proj"))
    model.decoder.config.model_type = "phi"  # a family without defaults: the targets must be given
    with pytest.raises(UserError, match="no default LoRA targets for a 'phi' decoder .* give --lora-targets"):
        default_targets(model.decoder)
    apply_freeze_policy(model, TrainConfig(freeze="lora", lora_targets="c_attn"))
    assert {name.split(".")[-4] for name in trainable(model.decoder)} == {"c_attn"}


def test_lora_options_come_from_config_files_and_flags(tmp_path: Path) -> None:
    from prefixcap.training import resolve_config

    path = tmp_path / "train.yaml"
    path.write_text("freeze: lora\nlora-rank: 8\nlora-alpha: 4\nlora-targets: c_attn,c_fc\n")
    config, given = resolve_config({"lora_rank": 2}, path)
    assert (config.lora_rank, config.lora_scale_alpha, config.lora_target_names) == (2, 4.0, ("c_attn", "c_fc"))
    assert given["lora_alpha"] == 4
    path.write_text("lora-rank: 0.5\n")
    with pytest.raises(UserError, match="lora_rank must be an integer, got 0.5"):
        resolve_config({}, path)
    path.write_text("lora-rank: 0\n")
    with pytest.raises(UserError, match=r"lora_rank must be in \[1, 4096\], got 0"):
        resolve_config({}, path)


def test_freeze_modes_on_a_llama_decoder(tiny_components, llama_dir: Path, tmp_path: Path) -> None:
    """first:N freezes the embeddings and the first N of Llama's `model.layers`; its untied LM
    head is the top of the model and trains; a tied one (SmolLM2) is the embedding, and does not."""
    model = CaptionModel.from_components(tiny_components[0], llama_dir, prefix_length=4)
    apply_freeze_policy(model, TrainConfig(freeze="first:1"))
    names = set(trainable(model.decoder))
    assert names and all(name.startswith(("model.layers.1.", "model.norm.", "lm_head.")) for name in names)
    assert "lm_head.weight" in names and not model.decoder.model.embed_tokens.weight.requires_grad
    with pytest.raises(UserError, match="only 2 blocks"):
        apply_freeze_policy(model, TrainConfig(freeze="first:3"))

    apply_freeze_policy(model, TrainConfig(freeze="frozen"))
    assert not trainable(model.decoder) and model.config.freeze_decoder
    apply_freeze_policy(model, TrainConfig(freeze="none"))
    assert len(trainable(model.decoder)) == len(list(model.decoder.parameters())) and not model.config.freeze_decoder

    tied = CaptionModel.from_components(tiny_components[0], build_decoder(tmp_path / "smollm2", "smollm2"))
    apply_freeze_policy(tied, TrainConfig(freeze="first:1"))
    assert not tied.decoder.lm_head.weight.requires_grad  # it is embed_tokens.weight


# ---------------------------------------------------------------------- decoding an unmerged adapter
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_engine_decodes_an_unmerged_adapter_as_hf_generate_does(
    tiny_components, llama_dir: Path, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation during a LoRA run captions with the unmerged decoder: the engine calls each
    adapted projection as a module (base + adapter), so its tokens are HF generate's."""
    model = lora_model(tiny_components[0], tiny_components[1] if family == "gpt2" else llama_dir)
    embeds = torch.randn(3, model.config.embed_dim)
    assert supported(model.decoder)
    fast = model.generate(image_embeds=embeds, max_new_tokens=8)
    monkeypatch.setattr("prefixcap.engine.backends.choose_backend", hf_generate_only)
    assert torch.equal(fast, model.generate(image_embeds=embeds, max_new_tokens=8))


# ---------------------------------------------------------------------- the model directory
def test_lora_model_directory_holds_the_adapter_and_reloads_merged(
    lora_model_dir: Path, tiny_components, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sorted(path.name for path in (lora_model_dir / ADAPTER_DIR).iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert not (lora_model_dir / "decoder").exists()
    config = CaptionConfig.load(lora_model_dir)
    assert config.decoder_adapter and config.decoder == str(tiny_components[1].resolve())

    merged = CaptionModel.from_pretrained(lora_model_dir)
    assert type(merged.decoder).__name__ == "GPT2LMHeadModel" and not has_adapter(merged.decoder)
    assert not any("lora" in name for name, _ in merged.decoder.named_modules())
    assert not merged.config.decoder_adapter and merged.decoder_source is None

    unmerged = CaptionModel.from_pretrained(lora_model_dir, merge_adapter=False)
    assert has_adapter(unmerged.decoder) and unmerged.config.decoder_adapter
    assert all(".lora_" in name for name in trainable(unmerged.decoder))
    embeds = torch.randn(4, merged.config.embed_dim)
    assert merged.caption(image_embeds=embeds) == unmerged.caption(image_embeds=embeds)
    apply_freeze_policy(merged, TrainConfig(freeze="lora"))  # a new adapter on merged weights: no base on disk
    with pytest.raises(ValueError, match="base decoder exists only in memory"):
        merged.save_pretrained(lora_model_dir.parent / "again")


def test_loading_a_lora_model_without_peft_is_one_line(
    lora_model_dir: Path, tiny_components, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    with pytest.raises(MissingExtraError) as error:
        CaptionModel.from_pretrained(lora_model_dir)
    message = str(error.value)
    assert "\n" not in message and str(lora_model_dir) in message and 'pip install "prefixcap[lora]"' in message
    model = CaptionModel.from_components(*tiny_components, prefix_length=4)
    with pytest.raises(MissingExtraError, match=r'--freeze lora needs peft: pip install "prefixcap\[lora\]"'):
        apply_freeze_policy(model, TrainConfig(freeze="lora"))


def test_damaged_adapters_are_one_line_errors(lora_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from prefixcap.errors import ModelLoadError

    broken = tmp_path / "model"
    shutil.copytree(lora_model_dir, broken)
    (broken / ADAPTER_DIR / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="damaged safetensors file"):
        CaptionModel.from_pretrained(broken)
    shutil.rmtree(broken / ADAPTER_DIR)
    with pytest.raises(ModelLoadError, match=f"missing {ADAPTER_DIR}/"):
        CaptionModel.from_pretrained(broken)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"lora_alpha": float("nan")}, "lora_alpha must be a number > 0 and at most 65536, got nan"),
        ({"lora_alpha": 1e39}, "lora_alpha must be a number > 0 and at most 65536, got 1e[+]39"),
        ({"lora_alpha": 0}, "lora_alpha must be a number > 0"),
        ({"lora_alpha": True}, "lora_alpha must be a number > 0"),
        ({"lora_alpha": "8"}, "lora_alpha must be a number > 0"),
        ({"r": 50_000_000}, r"r must be an integer between 1 and 32 \(the decoder's width\), got 50000000"),
        ({"r": 0}, "r must be an integer between 1 and 32"),
        ({"r": 4.0}, "r must be an integer between 1 and 32"),
        ({"modules_to_save": ["wte"]}, "modules_to_save is set"),
        ({"use_dora": True}, "use_dora is set"),
        ({"rank_pattern": {"c_fc": 64}}, "rank_pattern is set"),
        ({"megatron_core": "os"}, "megatron_core is set"),
        ({"peft_type": "ADALORA"}, "peft_type is set"),
        ({"target_modules": "c_.*"}, "target_modules must be a list of module names"),
        ({"target_modules": []}, "target_modules must be a list of module names"),
        ({"fan_in_fan_out": "yes"}, "fan_in_fan_out must be true or false"),
        ({"an_option_from_the_future": 1}, "an_option_from_the_future is set"),
    ],
)
def test_adapter_configs_prefixcap_does_not_write_are_refused_before_anything_is_allocated(
    lora_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict, reason: str
) -> None:
    """NaN or huge alpha gave empty captions with exit 0, r: 50000000 allocated 19 GB,
    modules_to_save a KeyError traceback. Refused in one line naming the file, before PEFT injects
    (allocates) a single layer."""
    import json
    import shutil

    import peft

    from prefixcap.errors import ModelLoadError

    broken = Path(shutil.copytree(lora_model_dir, tmp_path / "model"))
    path = broken / ADAPTER_DIR / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    def allocate(*args, **kwargs):
        raise AssertionError("the adapter's layers were allocated")

    monkeypatch.setattr(peft.LoraModel, "__init__", allocate)
    with pytest.raises(ModelLoadError, match=reason) as info:
        CaptionModel.from_pretrained(broken)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_an_adapter_whose_merged_weights_are_not_finite_is_refused(lora_model_dir: Path, tmp_path: Path) -> None:
    """Finite adapter tensors and an alpha in range can still overflow float32 once
    merged (B A x alpha / r); such a decoder gives empty captions, so it is refused."""
    import shutil

    from safetensors.torch import save_file

    from prefixcap.errors import ModelLoadError

    broken = Path(shutil.copytree(lora_model_dir, tmp_path / "model"))
    weights = load_file(broken / ADAPTER_DIR / ADAPTER_WEIGHTS)
    huge = {name: torch.full_like(tensor, 1e20) for name, tensor in weights.items()}  # B A: 1e40 x r, past 3.4e38
    save_file(huge, broken / ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert all(torch.isfinite(tensor).all() for tensor in load_file(broken / ADAPTER_DIR / ADAPTER_WEIGHTS).values())
    with pytest.raises(ModelLoadError, match="merging the adapter gives non-finite weights") as info:
        CaptionModel.from_pretrained(broken)
    assert str(broken / ADAPTER_DIR) in str(info.value) and "\n" not in str(info.value)
    CaptionModel.from_pretrained(broken, merge_adapter=False)  # unmerged, to train on: nothing overflowed yet


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"lora_rank": 33}, r"--lora-rank must be an integer between 1 and 32 \(the decoder's width\), got 33"),
        ({"lora_alpha": 1e6}, "--lora-alpha must be a number > 0 and at most 65536, got 1000000.0"),
    ],
)
def test_training_refuses_the_adapter_sizes_loading_would_refuse(tiny_components, options: dict, reason: str) -> None:
    model = CaptionModel.from_components(*tiny_components, prefix_length=4)
    with pytest.raises(UserError, match=reason):
        apply_freeze_policy(model, TrainConfig(freeze="lora", **options))


# ---------------------------------------------------------------------- runs
def test_lora_run_saves_megabytes_and_reloads_to_the_same_captions(
    tmp_path: Path, lora_features: Path, base_gpt2: Path, one_thread
) -> None:
    trainer = Trainer(run_config(lora_features, tmp_path / "run", base_gpt2, epochs=1))
    trainer.fit()
    best = tmp_path / "run" / "best"
    assert (best / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file() and not (best / "decoder").exists()
    adapter = load_file(best / ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())

    base_bytes = folder_bytes(base_gpt2) - sum(
        path.stat().st_size for path in base_gpt2.iterdir() if not path.name.endswith(".safetensors")
    )
    model_bytes = folder_bytes(best) - folder_bytes(best / "vision_encoder")  # the CLIP copy is not the decoder's
    assert model_bytes * 10 <= base_bytes, (model_bytes, base_bytes)

    reloaded = CaptionModel.from_pretrained(best)
    assert type(reloaded.decoder).__name__ == "GPT2LMHeadModel" and not has_adapter(reloaded.decoder)
    embeds = trainer.val_set.embeds[:6]
    assert reloaded.caption(image_embeds=embeds) == trainer.model.eval().caption(image_embeds=embeds)


def test_a_resumed_lora_run_ends_with_the_uninterrupted_weights(
    tmp_path: Path, lora_features: Path, tiny_components, one_thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints every 4 steps (6 per epoch); the run is stopped in step 10 and resumed from
    step 8, mid-epoch 2: adapters, optimizer, scheduler, RNG (GPT-2's dropout) and data position."""
    options = {"save_every": 4}
    Trainer(run_config(lora_features, tmp_path / "straight", tiny_components[1], **options)).fit()

    real_step, steps = trainer_module.train_step, []

    def stop_in_step_10(*args, **kwargs):
        steps.append(1)
        if len(steps) == 10:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    stopped = run_config(lora_features, tmp_path / "stopped", tiny_components[1], **options)
    monkeypatch.setattr(trainer_module, "train_step", stop_in_step_10)
    with pytest.raises(KeyboardInterrupt):
        Trainer(stopped).fit()
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    assert load_training_state(tmp_path / "stopped" / "last" / STATE_DIR).progress.step == 8
    with pytest.raises(UserError, match="--lora-rank 8 differs from the resumed run's 4"):
        Trainer(stopped, resume=True, given={"lora_rank": 8})
    resumed_run = Trainer(stopped, resume=True)
    steps = record_steps(monkeypatch, resumed_run)
    resumed_run.fit()
    assert steps == list(range(8, 12))  # from the checkpoint's step on, not from 0

    resumed, straight = lora_tensors(tmp_path / "stopped" / "last"), lora_tensors(tmp_path / "straight" / "last")
    assert resumed.keys() == straight.keys() and any(".lora_B." in name for name in straight)
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    assert (tmp_path / "stopped" / "last" / CONFIG_NAME).is_file()
    histories = [
        load_training_state(tmp_path / run / "last" / STATE_DIR).progress.history for run in ("stopped", "straight")
    ]
    assert histories[0] == histories[1]
