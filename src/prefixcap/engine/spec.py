"""The decoding request, normalised once: what the search does at every step.

`DecodeSpec` is frozen and hashable because it is part of the key under which CUDA graphs are
cached: two calls with equal specs (and batch shapes) replay the same graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class GenerationOptionsLike(Protocol):
    """The fields of `prefixcap.generation.GenerationOptions` that decoding reads (HF names)."""

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    length_penalty: float
    early_stopping: bool
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    no_repeat_ngram_size: int
    num_return_sequences: int


@dataclass(frozen=True)
class DecodeSpec:
    max_new_tokens: int  # decoding steps; every row gets at most this many tokens
    min_new_tokens: int  # stop tokens are banned before this many tokens
    num_beams: int  # 1: greedy or sampling; > 1: beam search
    length_penalty: float  # finished beam score = sum of log-probs / length ** length_penalty
    early_stopping: bool  # beam: an input is done once it has num_beams finished hypotheses
    do_sample: bool  # sample from the processed distribution instead of taking the argmax
    temperature: float  # sampling: logits are divided by this
    top_k: int  # sampling: keep only the k most likely tokens (0 = off)
    top_p: float  # sampling: keep the smallest set of tokens holding this much probability (1 = off)
    repetition_penalty: float  # HF/CTRL penalty on tokens already generated in the row (1 = off)
    no_repeat_ngram_size: int  # ban tokens that would repeat an n-gram of the row (0 = off)
    num_return_sequences: int  # sequences returned per input
    stop_token_ids: tuple[int, ...]  # EOS and any stop token; the token is kept, then padding
    pad_token_id: int  # fills rows after their stop token

    @classmethod
    def from_options(cls, options: GenerationOptionsLike, *, eos_token_ids: list[int], pad_token_id: int) -> DecodeSpec:
        spec = cls(
            max_new_tokens=options.max_new_tokens,
            min_new_tokens=options.min_new_tokens,
            num_beams=options.num_beams,
            length_penalty=float(options.length_penalty),
            early_stopping=bool(options.early_stopping),
            do_sample=options.do_sample,
            temperature=float(options.temperature),
            top_k=options.top_k,
            top_p=float(options.top_p),
            repetition_penalty=float(options.repetition_penalty),
            no_repeat_ngram_size=options.no_repeat_ngram_size,
            num_return_sequences=options.num_return_sequences,
            stop_token_ids=tuple(sorted(set(eos_token_ids))),
            pad_token_id=pad_token_id,
        )
        if spec.num_beams > 1 and spec.do_sample:
            raise ValueError("beam sampling is not supported: choose num_beams > 1 or do_sample=True")
        if spec.num_return_sequences > spec.num_beams and not spec.do_sample:
            raise ValueError("num_return_sequences must be <= num_beams without sampling")
        if not spec.stop_token_ids:
            raise ValueError("at least one stop token id (EOS) is needed")
        return spec

    @property
    def rows_per_input(self) -> int:
        """Decoder rows per input: one per beam, or one per returned sample."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    @property
    def processes_logits(self) -> bool:
        """Whether any rule changes the logits (if not, greedy can take the argmax directly)."""
        return (
            self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0 or self.min_new_tokens > 0 or self.do_sample
        )

    @property
    def rescales_logits(self) -> bool:
        """Whether a rule changes logit values other than by banning tokens (setting -inf)."""
        return self.repetition_penalty != 1.0 or self.do_sample
