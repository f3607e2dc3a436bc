"""The decoder families the engine runs: one table entry per architecture, holding everything
prefixcap knows about it (its engine forward, the configs that forward reproduces, its attention
window, the linear layers LoRA adapts, where its blocks live). A new Llama-shaped family is one
entry: its transformers class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from prefixcap.engine import gpt2, llama
from prefixcap.engine.runner import DecoderForward


@dataclass(frozen=True)
class DecoderFamily:
    name: str  # as logs and benchmarks say it ("prefixcap engine (qwen2)")
    model_class: str  # the transformers class whose forward the engine reproduces (exactly that class)
    model_type: str  # its config's model_type (LoRA targets and blocks apply to subclasses too)
    forward: Callable[..., DecoderForward]  # the engine forward over the model's own weights
    unsupported_reason: Callable[[nn.Module], str | None]  # what of a config that forward does not reproduce
    window: Callable[[nn.Module], int | None]  # the sliding attention window (None: full attention)
    lora_targets: tuple[str, ...]  # every linear layer of its blocks: what LoRA adapts by default
    blocks: str  # where its list of blocks lives, for `--freeze first:N`


def _full_attention(decoder: nn.Module) -> None:
    return None


def _llama_shaped(name: str, model_class: str) -> DecoderFamily:
    """A family with the Llama block (RMSNorm, RoPE, grouped-query attention, SwiGLU): `llama.LlamaForward`."""
    return DecoderFamily(
        name,
        model_class,
        name,
        llama.LlamaForward,
        llama.unsupported_reason,
        llama.window,
        llama.LINEARS,
        "model.layers",
    )


FAMILIES: dict[str, DecoderFamily] = {
    family.name: family
    for family in (
        DecoderFamily(
            "gpt2",
            "GPT2LMHeadModel",
            "gpt2",
            gpt2.GPT2Forward,
            gpt2.unsupported_reason,
            _full_attention,
            gpt2.LINEARS,
            "transformer.h",
        ),  # fmt: skip
        _llama_shaped("llama", "LlamaForCausalLM"),  # Llama 3.x, SmolLM2
        _llama_shaped("qwen2", "Qwen2ForCausalLM"),  # Qwen2/2.5: q/k/v biases
        _llama_shaped("qwen3", "Qwen3ForCausalLM"),  # per-head q/k RMSNorm
        _llama_shaped("mistral", "MistralForCausalLM"),  # a sliding window
    )
}


def family_of(decoder: nn.Module, *, exact: bool = True) -> DecoderFamily | None:
    """The family of `decoder`: with `exact`, only for exactly its transformers class (a subclass
    may change the forward); otherwise by its config's model_type."""
    if not exact:
        model_type = getattr(getattr(decoder, "config", None), "model_type", None)
        return next((family for family in FAMILIES.values() if family.model_type == model_type), None)
    family = _by_class().get(type(decoder).__name__)
    return family if family is not None and type(decoder) is _transformers_class(family.model_class) else None


def engine_support(decoder: nn.Module) -> tuple[DecoderFamily | None, str | None]:
    """(the decoder's family, None) when the engine reproduces it exactly, else (its family or
    None, why not)."""
    family = family_of(decoder)
    if family is None:
        return None, "not supported by the engine"
    return family, family.unsupported_reason(decoder)


@functools.cache
def _by_class() -> dict[str, DecoderFamily]:
    return {family.model_class: family for family in FAMILIES.values()}


def _transformers_class(name: str) -> type | None:
    import transformers

    return getattr(transformers, name, None)
