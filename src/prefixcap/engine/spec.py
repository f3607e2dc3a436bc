"""The decoding request, normalised once: what the search does at every step.

A `DecodeSpec` holds the caller's `GenerationOptions` (checked once, where they were made), what
decoding ends and pads with, and `key`: the options without the seed, which runs take as an
argument. Specs are frozen and compare by `key`, because they are part of the key under which CUDA
graphs are cached: two calls with equal specs (and batch shapes) replay the same graphs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from prefixcap.options import GenerationOptions


@dataclass(frozen=True)
class DecodeSpec:
    options: GenerationOptions = field(compare=False)
    stop_token_ids: tuple[int, ...]  # EOS and any stop token; the token is kept, then padding
    pad_token_id: int  # fills rows after their stop token
    key: tuple = field(init=False, repr=False)  # the options but the seed: what graphs are keyed on

    def __post_init__(self) -> None:
        if not self.stop_token_ids:
            raise ValueError("at least one stop token id (EOS) is needed")
        names = [option.name for option in dataclasses.fields(GenerationOptions) if option.name != "seed"]
        object.__setattr__(self, "key", tuple(getattr(self.options, name) for name in names))

    @classmethod
    def of(cls, options: GenerationOptions, *, eos_token_ids: list[int], pad_token_id: int) -> DecodeSpec:
        return cls(options, tuple(sorted(set(eos_token_ids))), pad_token_id)

    @property
    def rows_per_input(self) -> int:
        """Decoder rows per input: one per beam, or one per returned sample."""
        return self.options.num_beams if self.options.num_beams > 1 else self.options.num_return_sequences

    @property
    def processes_logits(self) -> bool:
        """Whether any rule changes the logits (if not, greedy can take the argmax directly)."""
        options = self.options
        return (
            options.repetition_penalty != 1.0
            or options.no_repeat_ngram_size > 0
            or options.min_new_tokens > 0
            or options.do_sample
        )

    @property
    def rescales_logits(self) -> bool:
        """Whether a rule changes logit values other than by banning tokens (setting -inf)."""
        return self.options.repetition_penalty != 1.0 or self.options.do_sample
