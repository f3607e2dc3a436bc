"""The decoding options: one schema for the Python API, the command-line flags, the server's request
fields and the decoding engine, which are all generated from it.

Names are Hugging Face `generate`'s, so that users can bring their habits along. Each field carries
its help text in its metadata, and `flag` where the command line calls it something else. No torch
here: the configuration and the command line import it cheaply.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefixcap.options.fields import Bounds, above, at_least, check_fields, option

# Below this, sampling is greedy decoding in all but name, and logits / temperature overflow to inf
# (at 1e-45 every token becomes NaN and captions come out empty).
MIN_TEMPERATURE = 1e-2


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode captions. Built from loose values (a config file, a request, keyword arguments)
    with `from_kwargs` or `resolve`; every instance is type- and range-checked."""

    max_new_tokens: int = option(30, "longest caption, in tokens", bounds=at_least(1))
    min_new_tokens: int = option(
        0, "shortest caption, in tokens (EOS and the stop token are banned before)", bounds=at_least(0)
    )
    num_beams: int = option(1, "beam search with this many beams (1 = greedy or sampling)", bounds=at_least(1))
    length_penalty: float = option(1.0, "beam search: score = sum of log-probs / length ** length_penalty")
    early_stopping: bool = option(True, "beam search: stop once num_beams captions are finished")
    do_sample: bool = option(False, "sample instead of greedy or beam search")
    temperature: float = option(
        1.0, f"sampling: divide the logits by this (at least {MIN_TEMPERATURE})", bounds=at_least(MIN_TEMPERATURE)
    )
    top_k: int = option(0, "sampling: keep the k most likely tokens (0 = all)", bounds=at_least(0))
    top_p: float = option(
        1.0,
        "sampling: keep the most likely tokens holding this much probability, in (0, 1]",
        bounds=Bounds(0, 1, low_open=True),
    )
    repetition_penalty: float = option(1.0, "> 1 discourages tokens already in the caption", bounds=above(0))
    no_repeat_ngram_size: int = option(0, "forbid repeating any n-gram of this size (0 = off)", bounds=at_least(0))
    num_return_sequences: int = option(
        1, "captions per image; without sampling, beam search with as many beams", bounds=at_least(1),
        flag="--num-captions",
    )  # fmt: skip
    seed: int | None = option(None, "sampling: seed for reproducible captions", bounds=Bounds(0, 2**63, high_open=True))

    def __post_init__(self) -> None:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(GenerationOptions)}
        check_fields(GenerationOptions, values)  # types, and the ranges of the fields' metadata
        for name in _FLOAT_OPTIONS:  # 1 and 1.0 alike: the same options, and HF gets floats
            object.__setattr__(self, name, float(values[name]))
        self.validate()

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> GenerationOptions:
        """The options `kwargs` names, the others at their defaults; ValueError names the first
        unknown, mistyped or out-of-range one."""
        _check_names(kwargs)
        return cls(**kwargs)

    @classmethod
    def resolve(cls, defaults: Mapping[str, Any], requested: Mapping[str, Any]) -> GenerationOptions:
        """`requested` over `defaults` (a model's). The one home of the rule: several captions
        without sampling, and no num_beams requested, switch beam search on with as many beams."""
        merged = {**defaults, **requested}
        _check_names(merged)
        check_fields(GenerationOptions, merged, ranges=False)  # the types, before the rule compares them
        captions = merged.get("num_return_sequences", 1)
        if captions > 1 and not merged.get("do_sample") and "num_beams" not in requested:
            merged["num_beams"] = max(merged.get("num_beams", 1), captions)
        return cls(**merged)

    def validate(self) -> None:
        """Raise ValueError with a readable reason for options that do not fit together (each
        one's own range is its field's `bounds`, checked by `check_fields`)."""
        checks = [
            (self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
            (
                self.do_sample or self.num_return_sequences <= self.num_beams,
                "num_return_sequences must be <= num_beams without sampling (greedy gives one caption)",
            ),
            (not (self.do_sample and self.num_beams > 1), "choose beam search or sampling, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


_FLOAT_OPTIONS = tuple(name for name, hint in typing.get_type_hints(GenerationOptions).items() if hint is float)


def _check_names(kwargs: Mapping[str, Any]) -> None:
    known = {option.name for option in dataclasses.fields(GenerationOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown generation option(s) {unknown}; valid: {sorted(known)}")
