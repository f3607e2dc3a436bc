"""The retrieval prompt: SmallCap's template by default, captions best first, within a token budget."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from prefixcap.errors import UserError
from prefixcap.retrieval import DEFAULT_TEMPLATE, check_template, retrieval_prompt

CAPTIONS = ["a man riding a horse on a beach", "two dogs playing with a ball in the grass.", "a cat on a couch!"]


@pytest.fixture(scope="module")
def tokenizer(tiny_components):
    return AutoTokenizer.from_pretrained(tiny_components[1])


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_the_default_is_smallcaps_template(tokenizer) -> None:
    assert DEFAULT_TEMPLATE == "Similar images show {captions} This image shows"
    assert retrieval_prompt(CAPTIONS, tokenizer, 1000) == (
        "Similar images show a man riding a horse on a beach. two dogs playing with a ball in the grass. "
        "a cat on a couch! This image shows"
    )


def test_the_template_is_a_setting(tokenizer) -> None:
    prompt = retrieval_prompt(CAPTIONS[:2], tokenizer, 1000, template="In this  house style: {captions}\nNow:")
    assert prompt == (
        "In this house style: a man riding a horse on a beach. two dogs playing with a ball in the grass. Now:"
    )


def test_captions_are_kept_whole_and_best_first_within_the_budget(tokenizer) -> None:
    full = [retrieval_prompt(CAPTIONS[:n], tokenizer, 1000) for n in range(4)]
    lengths = [tokens(tokenizer, prompt) for prompt in full]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4  # the precondition: each caption adds tokens
    for count in range(1, 4):
        for budget in range(lengths[count], lengths[count + 1] if count < 3 else lengths[count] + 3):
            prompt = retrieval_prompt(CAPTIONS, tokenizer, budget)
            assert prompt == full[count] and tokens(tokenizer, prompt) <= budget


def test_the_best_caption_is_cut_by_words_when_it_alone_is_over_the_budget(tokenizer) -> None:
    bare = tokens(tokenizer, retrieval_prompt([], tokenizer, 1000))
    whole = tokens(tokenizer, retrieval_prompt(CAPTIONS[:1], tokenizer, 1000))
    for budget in range(bare, whole):
        prompt = retrieval_prompt(CAPTIONS, tokenizer, budget)
        assert tokens(tokenizer, prompt) <= budget
        middle = prompt.removeprefix("Similar images show").removesuffix("This image shows").strip()
        assert CAPTIONS[0].startswith(middle)
    assert retrieval_prompt(CAPTIONS, tokenizer, whole - 1) != retrieval_prompt([], tokenizer, 1000)


def test_a_template_over_the_budget_is_refused(tokenizer) -> None:
    with pytest.raises(UserError, match="template alone takes"):
        retrieval_prompt(CAPTIONS, tokenizer, 2)


@pytest.mark.parametrize("template", ["Similar images show", "{captions} and {captions}", "x" * 1001 + "{captions}"])
def test_a_template_needs_one_captions_field(template: str) -> None:
    with pytest.raises(UserError):
        check_template(template)


def test_braces_in_captions_are_text(tokenizer) -> None:
    assert retrieval_prompt(["a {captions} sign", "{0}"], tokenizer, 1000) == (
        "Similar images show a {captions} sign. {0}. This image shows"
    )
