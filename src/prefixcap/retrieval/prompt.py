"""The prompt that puts retrieved captions before the caption model's own (SmallCap, CVPR 2023).

    retrieval_prompt(["a dog on a beach", "a brown dog runs."], tokenizer, 40)
    -> "Similar images show a dog on a beach. a brown dog runs. This image shows"

The template is a setting; `{captions}` marks where the captions go, each one whitespace-normalised
and ended as a sentence. The prompt is kept within a budget of decoder tokens, counted as
`CaptionModel.prompt_ids` counts them: whole captions in rank order while they fit, the best one
cut short (by words) when not even it fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefixcap.errors import UserError
from prefixcap.options import clean_prompt
from prefixcap.options.text import CAPTIONS_FIELD, template_problem

DEFAULT_TEMPLATE = "Similar images show {captions} This image shows"
SENTENCE_ENDS = (".", "!", "?")


def check_template(template: str) -> str:
    """`template`, whitespace-normalised; refused unless it holds `{captions}` exactly once."""
    problem = template_problem(template)
    if problem is not None:
        raise UserError(problem)
    return clean_prompt(template)


def retrieval_prompt(captions: Sequence[str], tokenizer: Any, max_tokens: int, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt for one image from its retrieved `captions` (best first), at most `max_tokens`
    tokens of the decoder's `tokenizer`."""
    template = check_template(template)

    def fill(sentences: Sequence[str]) -> str:
        return clean_prompt(template.replace(CAPTIONS_FIELD, " ".join(sentences)))

    def fits(sentences: Sequence[str]) -> bool:
        return len(tokenizer.encode(fill(sentences), add_special_tokens=False)) <= max_tokens

    if not fits([]):
        length = len(tokenizer.encode(fill([]), add_special_tokens=False))
        raise UserError(f"the retrieval prompt template alone takes {length} tokens, over the budget of {max_tokens}")
    sentences = [_sentence(caption) for caption in captions]
    sentences = [sentence for sentence in sentences if sentence]
    kept: list[str] = []
    for sentence in sentences:
        if not fits([*kept, sentence]):
            break
        kept.append(sentence)
    if not kept and sentences:  # not even the best caption fits whole: as many of its words as do
        words = sentences[0].split()
        low, high = 0, len(words)  # the most words that fit lies in [low, high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits([" ".join(words[:middle])]) else (low, middle)
        kept = [" ".join(words[:low])] if low else []
    return fill(kept)


def _sentence(caption: str) -> str:
    """A caption whitespace-normalised and ended with a full stop unless it ends a sentence already."""
    text = clean_prompt(caption)
    return text if not text or text.endswith(SENTENCE_ENDS) else text + "."
