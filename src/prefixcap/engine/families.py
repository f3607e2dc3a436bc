"""What `DecodeRunner` needs from a decoder, written down once, and which forward serves a decoder.

A forward wraps one decoder's weights (in place) and runs it against a static KV cache that it
allocates itself; the runner owns the cache tensors, the search and the step loop. The GPT-2 and
Llama-family forwards (`gpt2.GPT2Forward`, `llama.LlamaForward`) implement it; so can a forward
on another runtime, since the runner only calls what `DecoderForward` lists.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from prefixcap.engine import gpt2, llama


class DecoderForward(Protocol):
    """A decoder's forward pass against a static KV cache, for `DecodeRunner`.

    The cache is whatever `new_cache` returns, one tensor whose dim 2 is the row and dim 4 the
    position (the runner copies prefix rows and reorders beams along those): for the torch
    forwards, [layers, 2 (key, value), rows, kv_heads, length, head_dim].
    """

    max_positions: int  # the most positions (prefix + generated) a decode may take

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def hidden_size(self) -> int: ...

    def new_cache(self, rows: int, length: int) -> torch.Tensor:
        """A zeroed cache for `rows` sequences of up to `length` positions."""
        ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [rows, 1, E] of `tokens` [rows], to feed a decode step."""
        ...

    def __call__(self, embeds: torch.Tensor, start: int, cache: torch.Tensor) -> torch.Tensor:
        """Run `embeds` [rows, S, E] at positions start..start+S-1 (the prefill: start 0, causal;
        a decode step: S = 1), writing their keys and values into `cache`; return the final
        (normed) hidden state of the last position, [rows, E]."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [rows, V] (a view is fine) from `__call__`'s hidden state."""
        ...

    def refresh(self) -> None:
        """Called at the start of every decode: bring any copy of the weights up to date."""
        ...


def family(decoder: nn.Module) -> str | None:
    """The engine's name for the decoder's architecture ("gpt2", "llama", "qwen2", "qwen3",
    "mistral"), or None when the engine has no forward for its class."""
    from transformers import GPT2LMHeadModel

    if type(decoder) is GPT2LMHeadModel:
        return "gpt2"
    return llama.family(decoder)


def unsupported_reason(decoder: nn.Module) -> str | None:
    """None when the engine reproduces `decoder` exactly, else a short reason."""
    name = family(decoder)
    if name is None:
        return "not supported by the engine"
    return gpt2.unsupported_reason(decoder) if name == "gpt2" else llama.unsupported_reason(decoder)


def supports(decoder: nn.Module) -> bool:
    """Whether the engine decodes `decoder` (for a Mistral-like sliding window, see `fits`)."""
    return unsupported_reason(decoder) is None


def window(decoder: nn.Module) -> int | None:
    """The decoder's sliding attention window, or None when it attends to every position."""
    return llama.window(decoder) if family(decoder) not in (None, "gpt2") else None


def decoder_forward(decoder: nn.Module, *, compile_blocks: bool = False) -> DecoderForward:
    """The forward that runs `decoder` (which `supports` must accept), over its weights in place."""
    reason = unsupported_reason(decoder)
    if reason is not None:
        raise ValueError(f"the decoding engine cannot run {type(decoder).__name__}: {reason}")
    if family(decoder) == "gpt2":
        return gpt2.GPT2Forward(decoder, compile_blocks=compile_blocks)
    return llama.LlamaForward(decoder, compile_blocks=compile_blocks)
