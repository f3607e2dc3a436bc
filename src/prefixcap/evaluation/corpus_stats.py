"""Corpus statistics of generated captions: how varied, how long, how novel, how repetitive.

These catch failure modes the reference metrics reward or hide: a model that emits the same
safe caption for every image, copies training captions verbatim, or loops ("a man a man ...").
All counts are on `simple_tokenize`d words, so case and punctuation do not matter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prefixcap.evaluation.coco_metrics import simple_tokenize


def has_repetition(words: Sequence[str]) -> bool:
    """True when a word follows itself ("the the") or a word trigram recurs ("on a table on a table").

    Trigrams, not bigrams: fluent captions repeat bigrams ("a man and a woman and a dog").
    """
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < len(trigrams)


def corpus_stats(captions: Sequence[str], train_captions: Iterable[str] | None = None) -> dict[str, float]:
    """Statistics named as in metrics.json; shares are percentages.

    - vocab_size: distinct words over all captions;
    - mean_length: words per caption;
    - unique_captions_pct: distinct captions / captions;
    - repetition_rate_pct: captions for which `has_repetition` holds;
    - novel_captions_pct: captions that are not a training caption (only with `train_captions`).
    """
    tokenized = [simple_tokenize(caption) for caption in captions]
    words = [caption.split() for caption in tokenized]
    n = max(len(captions), 1)
    stats = {
        "num_captions": len(captions),
        "vocab_size": len({word for caption in words for word in caption}),
        "mean_length": sum(map(len, words)) / n,
        "unique_captions_pct": 100 * len(set(tokenized)) / n,
        "repetition_rate_pct": 100 * sum(map(has_repetition, words)) / n,
    }
    if train_captions is not None:
        seen = {simple_tokenize(caption) for caption in train_captions}
        stats["novel_captions_pct"] = 100 * sum(caption not in seen for caption in tokenized) / n
    return stats
