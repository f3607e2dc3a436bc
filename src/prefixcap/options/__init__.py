"""The decoding options: one schema for the Python API, the command-line flags, the server's request
fields and the decoding engine, which are all generated from it.

Names are Hugging Face `generate`'s, so that users can bring their habits along. Each field carries
its help text in its metadata, and `flag` where the command line calls it something else. No torch
here: the configuration and the command line import it cheaply.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefixcap.options.fields import check_types

# Below this, sampling is greedy decoding in all but name, and logits / temperature overflow to inf
# (at 1e-45 every token becomes NaN and captions come out empty).
MIN_TEMPERATURE = 1e-2


def _option(default: Any, help: str, **cli: Any) -> Any:
    """A field with its help text, and `flag="--name"` where the command line's flag differs."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode captions. Built from loose values (a config file, a request, keyword arguments)
    with `from_kwargs` or `resolve`; every instance is type- and range-checked."""

    max_new_tokens: int = _option(30, "longest caption, in tokens")
    min_new_tokens: int = _option(0, "shortest caption, in tokens (EOS and the stop token are banned before)")
    num_beams: int = _option(1, "beam search with this many beams (1 = greedy or sampling)")
    length_penalty: float = _option(1.0, "beam search: score = sum of log-probs / length ** length_penalty")
    early_stopping: bool = _option(True, "beam search: stop once num_beams captions are finished")
    do_sample: bool = _option(False, "sample instead of greedy or beam search")
    temperature: float = _option(1.0, f"sampling: divide the logits by this (at least {MIN_TEMPERATURE})")
    top_k: int = _option(0, "sampling: keep the k most likely tokens (0 = all)")
    top_p: float = _option(1.0, "sampling: keep the most likely tokens holding this much probability, in (0, 1]")
    repetition_penalty: float = _option(1.0, "> 1 discourages tokens already in the caption")
    no_repeat_ngram_size: int = _option(0, "forbid repeating any n-gram of this size (0 = off)")
    num_return_sequences: int = _option(
        1, "captions per image; without sampling, beam search with as many beams", flag="--num-captions"
    )
    seed: int | None = _option(None, "sampling: seed for reproducible captions")

    def __post_init__(self) -> None:
        values = {option.name: getattr(self, option.name) for option in dataclasses.fields(GenerationOptions)}
        check_types(GenerationOptions, values)
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
        check_types(GenerationOptions, merged)  # before the rule compares them
        captions = merged.get("num_return_sequences", 1)
        if captions > 1 and not merged.get("do_sample") and "num_beams" not in requested:
            merged["num_beams"] = max(merged.get("num_beams", 1), captions)
        return cls(**merged)

    def validate(self) -> None:
        """Raise ValueError with a readable reason for any option out of range: the only range checks."""
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


_FLOAT_OPTIONS = tuple(name for name, hint in typing.get_type_hints(GenerationOptions).items() if hint is float)


def _check_names(kwargs: Mapping[str, Any]) -> None:
    known = {option.name for option in dataclasses.fields(GenerationOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown generation option(s) {unknown}; valid: {sorted(known)}")


# Longest prompt, prefix or suffix, in characters: far above any real use, and it keeps one server
# request from tokenising megabytes. The prompt's tokens are also checked against the decoder's positions.
MAX_TEXT_CHARS = 1000


def is_unicode(text: str) -> bool:
    """Whether `text` can be written as UTF-8: no lone surrogates, which Python uses for the
    undecodable bytes of command-line arguments and which JSON's \\ud800 escapes produce."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_prompt(prompt: str) -> str:
    """A prompt with its whitespace normalised, as captions are: training and inference must agree on
    its tokens, and a trailing space would make GPT-2 continue mid-word."""
    return " ".join(prompt.split())


@dataclass(frozen=True)
class TextOptions:
    """The text around each caption: a prompt the decoder continues, and a prefix and suffix put
    around the result. Separate from GenerationOptions, which are Hugging Face `generate`'s; the
    CLI flags and the server's request fields are generated from both."""

    prompt: str | None = _option(
        None,
        "text the decoder continues after the image, e.g. 'a photo of' (default: the prompt the model was "
        "trained with, if any; '' for none); the caption leaves it out unless --keep-prompt",
    )
    keep_prompt: bool = _option(False, "start each caption with the prompt")
    prefix: str = _option("", "text put before each caption, e.g. a trigger word: 'sks person, '")
    suffix: str = _option("", "text put after each caption")

    def __post_init__(self) -> None:
        check_types(TextOptions, {option.name: getattr(self, option.name) for option in dataclasses.fields(self)})
        for name in ("prompt", "prefix", "suffix"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_TEXT_CHARS:
                raise ValueError(f"{name} must be at most {MAX_TEXT_CHARS} characters, got {len(value)}")
            if value is not None and not is_unicode(value):
                raise ValueError(
                    f"{name} is not valid Unicode text (a lone surrogate, e.g. a byte that is not UTF-8): "
                    "no output could hold it"
                )

    @staticmethod
    def split(kwargs: Mapping[str, Any]) -> tuple[TextOptions, dict[str, Any]]:
        """(the TextOptions among `kwargs`, the rest: generation options), so that one set of
        keyword arguments can carry both through the Captioner, the jobs and the server."""
        names = {option.name for option in dataclasses.fields(TextOptions)}
        text = TextOptions(**{name: value for name, value in kwargs.items() if name in names})
        return text, {name: value for name, value in kwargs.items() if name not in names}

    def wrap(self, caption: str) -> str:
        return f"{self.prefix}{caption}{self.suffix}"
