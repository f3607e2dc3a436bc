"""The caption text options: a prompt the decoder continues, and a prefix and suffix put around each
caption. Separate from the decoding options, which are Hugging Face `generate`'s."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefixcap.options.fields import check_fields, option

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

    prompt: str | None = option(
        None,
        "text the decoder continues after the image, e.g. 'a photo of' (default: the prompt the model was "
        "trained with, if any; '' for none); the caption leaves it out unless --keep-prompt",
    )
    keep_prompt: bool = option(False, "start each caption with the prompt")
    prefix: str = option("", "text put before each caption, e.g. a trigger word: 'sks person, '")
    suffix: str = option("", "text put after each caption")

    def __post_init__(self) -> None:
        check_fields(TextOptions, {option.name: getattr(self, option.name) for option in dataclasses.fields(self)})
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


# Where a retrieval prompt template (`prefixcap.retrieval.prompt`) puts the retrieved captions.
CAPTIONS_FIELD = "{captions}"


def template_problem(template: str) -> str | None:
    """Why `template` cannot be a retrieval prompt template, or None: the one rule, which a
    training option and a model's config are both checked against."""
    if not isinstance(template, str) or not is_unicode(template):
        return "a retrieval prompt template must be Unicode text"
    text = clean_prompt(template)
    if text.count(CAPTIONS_FIELD) != 1:
        return f"a retrieval prompt template must contain {CAPTIONS_FIELD} once, got {template[:100]!r}"
    if len(text) > MAX_TEXT_CHARS:
        return f"a retrieval prompt template must be at most {MAX_TEXT_CHARS} characters"
    return None
