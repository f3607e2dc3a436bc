"""The pieces of one training step, shared by `Trainer` and `benchmarks/bench_train.py`: the
Accelerator, which parameters train (`apply_freeze_policy`), the optimizer and LR schedule, and
the step itself."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from prefixcap.engine.families import family_of
from prefixcap.errors import UserError
from prefixcap.model.caption_model import CaptionModel
from prefixcap.model.lora import add_lora, has_adapter
from prefixcap.training.config import TrainConfig


def default_precision() -> str:
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def apply_freeze_policy(model: CaptionModel, config: TrainConfig) -> None:
    """Set which parameters of `model` train, as `config.freeze` says: the one place that decides
    it, for a new model, an `--init` model and a resumed checkpoint alike. The mapper always
    trains; the image encoder never does (CaptionModel freezes it).

    frozen: not the decoder (ClipCap's prefix-only mode). none: all of it. first:N: all but its
    embeddings and first N blocks. lora: only LoRA adapters on it, new ones (`config.lora_*`),
    or the ones it carries already (a LoRA model loaded with `merge_adapter=False`), which then
    continue training."""
    decoder = model.decoder
    model.mapper.requires_grad_(True)
    model.config.freeze_decoder = config.freeze == "frozen"
    if config.freeze == "lora":
        if not has_adapter(decoder):  # (an adapter that was loaded trainable keeps its own settings)
            add_lora(decoder, config.lora_rank, config.lora_scale_alpha, config.lora_target_names)
        model.config.decoder_adapter = True
        return
    if has_adapter(decoder):
        raise UserError(
            f"--freeze {config.freeze}: the decoder carries a LoRA adapter; load the model with it merged "
            "(CaptionModel.from_pretrained's default) to train the decoder itself"
        )
    decoder.requires_grad_(config.freeze != "frozen")
    if config.frozen_blocks is not None:
        freeze_first_blocks(decoder, config.frozen_blocks)


def freeze_first_blocks(decoder: nn.Module, count: int) -> None:
    """Freeze the decoder's input embeddings (and GPT-2's learned positions) and its first `count`
    blocks (where its family keeps them, `prefixcap.engine.families`; for other decoders, the base
    model's `h` or `layers`), e.g. 10 of GPT-2's 12 (the README's linear-mapper baseline). A tied output layer
    (GPT-2, SmolLM2, Qwen2.5-0.5B) is the input embedding, so it stays frozen too; an untied one
    (Llama 3 8B, Mistral) is the top of the model and trains."""
    base = decoder.base_model
    family = family_of(decoder, exact=False)
    if family is not None:
        blocks = decoder.get_submodule(family.blocks)
    else:
        blocks = next(
            (getattr(base, name) for name in ("h", "layers") if isinstance(getattr(base, name, None), nn.ModuleList)),
            None,
        )
    if blocks is None:
        raise UserError(f"--freeze first:N: cannot find the blocks of a {type(decoder).__name__}")
    if count > len(blocks):
        raise UserError(f"--freeze first:{count}: the decoder has only {len(blocks)} blocks")
    decoder.get_input_embeddings().requires_grad_(False)
    if isinstance(getattr(base, "wpe", None), nn.Module):
        base.wpe.requires_grad_(False)
    for block in blocks[:count]:
        block.requires_grad_(False)


def build_accelerator(config: TrainConfig):
    """The Accelerator for `config`: its precision as autocast, torch.compile if asked, and gloo
    across CPU processes when there is no GPU."""
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision={"fp32": "no"}.get(config.precision, config.precision),
        cpu=not torch.cuda.is_available(),
        dynamo_backend="inductor" if config.compile else "no",
    )


def train_step(
    objective: nn.Module,
    optimizer,
    scheduler,
    accelerator,
    micro_batches: list[dict[str, torch.Tensor]],
    max_grad_norm: float,
) -> torch.Tensor:
    """One optimizer step of the (prepared) `objective`, a CaptionLoss: forward and backward over
    the micro-batches (gradients synchronised across processes after the last one only), clip,
    step; returns the mean loss, on the device."""
    total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(objective):
            batch = {name: tensor.to(accelerator.device, non_blocking=True) for name, tensor in batch.items()}
            loss = objective(**batch) / len(micro_batches)
            accelerator.backward(loss)
        total += loss.detach()
    if max_grad_norm:
        accelerator.clip_grad_norm_(objective.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (nanoGPT's rule), fused
    kernels on CUDA."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Linear warm-up, then linear or cosine decay to zero (transformers' schedules)."""
    from transformers import get_scheduler

    warmup = round(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    return get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
