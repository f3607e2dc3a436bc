"""Decoding options, and generation from prefix embeddings.

The options use Hugging Face `generate` names so that users can bring their habits along.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from prefixcap import engine

# Below this, sampling is greedy decoding in all but name, and logits / temperature overflow to inf
# (at 1e-45 every token becomes NaN and captions come out empty).
MIN_TEMPERATURE = 1e-2


@dataclass
class GenerationOptions:
    max_new_tokens: int = 30  # upper bound on caption length, in tokens
    min_new_tokens: int = 0  # EOS and the stop token are forbidden before this many tokens
    num_beams: int = 1  # > 1 turns on beam search
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    early_stopping: bool = True  # beam search ends once num_beams hypotheses are finished
    do_sample: bool = False  # sample instead of taking the most likely token
    temperature: float = 1.0  # sampling: divide logits by this
    top_k: int = 0  # sampling: keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # sampling: keep the smallest set of tokens with this much probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the caption
    no_repeat_ngram_size: int = 0  # forbid repeating any n-gram of this size (0 = off)
    num_return_sequences: int = 1  # captions per image (distinct under beam search and sampling)
    seed: int | None = None  # sampling: fixed seed for reproducible captions

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> GenerationOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; valid: {sorted(known)}")
        options = cls(**kwargs)
        options.validate()
        return options

    def validate(self) -> None:
        """Raise ValueError with a readable reason for any option out of range."""
        for option in dataclasses.fields(self):
            value = getattr(self, option.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{option.name} must be a finite number, got {value}")
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.temperature >= MIN_TEMPERATURE, f"temperature must be >= {MIN_TEMPERATURE}"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
            (self.num_return_sequences >= 1, "num_return_sequences must be >= 1"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
            (
                self.do_sample or self.num_return_sequences <= self.num_beams,
                "num_return_sequences must be <= num_beams without sampling (greedy gives one caption)",
            ),
            (not (self.do_sample and self.num_beams > 1), "choose beam search or sampling, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def generate_from_prefix(
    decoder: PreTrainedModel,
    prefix_embeds: torch.Tensor,
    options: GenerationOptions,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
) -> torch.Tensor:
    """New token ids [B * num_return_sequences, T] continuing `prefix_embeds` [B, K, E]; rows are
    padded with `pad_token_id` after their stop token, which is kept.

    GPT-2 decoders run on prefixcap's decoding engine (`prefixcap.engine`: the same tokens as HF
    `generate` for greedy and beam search, faster, most of all on CUDA); other decoders use HF
    `generate`."""
    if engine.supports(decoder):
        return engine.generate_from_prefix(
            decoder, prefix_embeds, options, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id
        )
    if options.seed is not None:
        torch.manual_seed(options.seed)
    attention_mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device)
    kwargs = dataclasses.asdict(options)
    kwargs.pop("seed")
    # HF warns about options the chosen mode ignores: drop them
    if not options.do_sample:
        for name in ("temperature", "top_k", "top_p"):
            kwargs.pop(name)
    if options.num_beams == 1:
        for name in ("length_penalty", "early_stopping"):
            kwargs.pop(name)
    return decoder.generate(
        inputs_embeds=prefix_embeds,
        attention_mask=attention_mask,
        eos_token_id=eos_token_ids,
        pad_token_id=pad_token_id,
        **kwargs,
    )
