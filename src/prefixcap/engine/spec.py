"""The decoding request, normalised once: what the search does at every step.

`DecodeSpec` is frozen and hashable because it is part of the key under which CUDA graphs are
cached: two calls with equal specs (and batch shapes) replay the same graphs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prefixcap.options import GenerationOptions


@dataclass(frozen=True)
class DecodeSpec(GenerationOptions):
    """The options (checked and validated as such), what decoding ends and pads with, and no seed:
    the seed is an argument of each run, not part of the graphs."""

    stop_token_ids: tuple[int, ...] = ()  # EOS and any stop token; the token is kept, then padding
    pad_token_id: int = 0  # fills rows after their stop token

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stop_token_ids:
            raise ValueError("at least one stop token id (EOS) is needed")

    @classmethod
    def from_options(cls, options: GenerationOptions, *, eos_token_ids: list[int], pad_token_id: int) -> DecodeSpec:
        return cls(
            **{**dataclasses.asdict(options), "seed": None},
            stop_token_ids=tuple(sorted(set(eos_token_ids))),
            pad_token_id=pad_token_id,
        )

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
