"""Who decodes: the one decision between the decoding engine and Hugging Face `generate`.

`choose_backend` looks a decoder up once: a family the engine reproduces exactly (and a decode
that fits its attention window) runs on the engine; any other causal LM on HF `generate`; a
forward on another runtime (ONNX Runtime's `OrtDecoder`) on the engine's runner and searches.
Each backend says what it is in a few words, for logs and benchmarks, and generates from prefix
embeddings. `generate` chooses, logs the path once per decoder, and runs it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from prefixcap import engine
from prefixcap.engine.ragged import check_lengths, left_padded
from prefixcap.engine.runner import DecoderForward
from prefixcap.engine.spec import DecodeSpec

logger = logging.getLogger("prefixcap")


class Backend(Protocol):
    description: str  # e.g. "prefixcap engine (llama)", "HF generate (PhiForCausalLM: not supported by the engine)"

    def generate(
        self, prefix_embeds: torch.Tensor, spec: DecodeSpec, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """New token ids [B * rows_per_input, T] continuing `prefix_embeds` [B, K, E], padded after
        the stop; `lengths` [B]: rows of different lengths, right-padded (`engine.ragged`)."""
        ...


@dataclass(frozen=True)
class EngineBackend:
    decoder: nn.Module | DecoderForward
    description: str

    def generate(
        self, prefix_embeds: torch.Tensor, spec: DecodeSpec, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        return engine.generate(self.decoder, prefix_embeds, spec, lengths=lengths)


@dataclass(frozen=True)
class HFGenerateBackend:
    decoder: nn.Module
    description: str

    @torch.no_grad()
    def generate(
        self, prefix_embeds: torch.Tensor, spec: DecodeSpec, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """HF `generate`; ragged rows are moved to the right end, with an attention mask over the
        padding before them (from which HF also derives each row's position ids)."""
        options = spec.options
        if options.seed is not None:
            torch.manual_seed(options.seed)
        kwargs: dict[str, Any] = dataclasses.asdict(options)
        kwargs.pop("seed")
        # HF warns about options the chosen mode ignores: drop them
        if not options.do_sample:
            for name in ("temperature", "top_k", "top_p"):
                kwargs.pop(name)
        if options.num_beams == 1:
            for name in ("length_penalty", "early_stopping"):
                kwargs.pop(name)
        prefix_embeds, lengths = check_lengths(prefix_embeds, lengths)
        if lengths is None:
            attention_mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device)
        else:
            prefix_embeds, attention_mask = left_padded(prefix_embeds, lengths)
        return self.decoder.generate(
            inputs_embeds=prefix_embeds, attention_mask=attention_mask, eos_token_id=list(spec.stop_token_ids),
            pad_token_id=spec.pad_token_id, **kwargs,
        )  # fmt: skip


def choose_backend(decoder: nn.Module | DecoderForward, positions: int | None = None) -> Backend:
    """The backend that decodes with `decoder` over `positions` positions (prefix + max_new_tokens
    - 1; None: any decode): the engine when it reproduces the decoder exactly and the decode stays
    within its sliding window, if it has one; HF `generate` otherwise. A forward on another runtime
    (not an nn.Module) always runs on the engine and names itself (its `description`)."""
    if not isinstance(decoder, nn.Module):
        return EngineBackend(decoder, decoder.description)
    name = type(decoder).__name__
    family, reason = engine.engine_support(decoder)
    if family is None or reason is not None:
        return HFGenerateBackend(decoder, f"HF generate ({name}: {reason})")
    window = family.window(decoder)
    if positions is not None and window is not None and positions > window:
        return HFGenerateBackend(decoder, f"HF generate ({name}: {positions} positions exceed its {window}-position sliding window)")  # fmt: skip
    return EngineBackend(decoder, f"prefixcap engine ({family.name})")


def generate(
    decoder: nn.Module | DecoderForward,
    prefix_embeds: torch.Tensor,
    spec: DecodeSpec,
    lengths: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """New token ids [B * rows_per_input, T] continuing `prefix_embeds` [B, K, E] on the backend
    `choose_backend` picks; rows are padded with the pad token after their stop token, which is
    kept. `lengths` [B] gives rows of different lengths, right-padded (`engine.ragged`): every
    backend decodes them in one batch, as each row alone. The path taken is logged at INFO once
    per decoder (and again if it changes: a decode longer than a sliding window moves to HF generate)."""
    prefix_embeds, lengths = check_lengths(prefix_embeds, lengths)
    backend = choose_backend(decoder, prefix_embeds.shape[1] + spec.options.max_new_tokens - 1)
    _log_path(decoder, backend.description)
    return backend.generate(prefix_embeds, spec, lengths)


# The path last logged per decoder.
_logged_paths: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_logged_lock = threading.Lock()


def _log_path(decoder: nn.Module | DecoderForward, path: str) -> None:
    with _logged_lock:
        if _logged_paths.get(decoder) == path:
            return
        _logged_paths[decoder] = path
    logger.info("generating with %s", path)
