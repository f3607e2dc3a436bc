"""Corpus statistics of generated captions."""

from __future__ import annotations

import pytest

from prefixcap.evaluation.corpus_stats import corpus_stats, has_repetition


@pytest.mark.parametrize(
    ("caption", "repeated"),
    [
        ("a man and a woman and a dog", False),  # repeated bigrams are fluent English
        ("a dog on a couch", False),
        ("a a dog on a couch", True),  # a word twice in a row
        ("a man riding a man riding a horse", True),  # a recurring trigram
        ("on a table on a table", True),
    ],
)
def test_repetition(caption: str, repeated: bool) -> None:
    assert has_repetition(caption.split()) is repeated


def test_corpus_stats() -> None:
    captions = ["A dog on a couch.", "a dog on a couch", "the the cat", "A red bus!"]
    train = ["a dog on a couch", "a cat on a mat"]
    stats = corpus_stats(captions, train)
    assert stats["num_captions"] == 4
    assert stats["vocab_size"] == len({"a", "dog", "on", "couch", "the", "cat", "red", "bus"})
    assert stats["mean_length"] == pytest.approx((5 + 5 + 3 + 3) / 4)
    assert stats["unique_captions_pct"] == pytest.approx(75.0)  # case and punctuation do not count
    assert stats["repetition_rate_pct"] == pytest.approx(25.0)
    assert stats["novel_captions_pct"] == pytest.approx(50.0)
    assert "novel_captions_pct" not in corpus_stats(captions)  # unknown without training captions


def test_exact_match_counts_captions_equal_to_one_of_their_references() -> None:
    captions = ["A red shape on a white background.", "a blue shape", "a green shape", "a cat"]
    references = [
        ["a red shape on a white background"],  # equal but for case and punctuation
        ["a blue shape on a black background", "a blue shape"],  # equal to the second reference
        ["a red shape"],
        ["a dog", "a cat on a mat"],
    ]
    assert corpus_stats(captions, references=references)["exact_match_pct"] == pytest.approx(50.0)
    assert "exact_match_pct" not in corpus_stats(captions)  # unknown without references
