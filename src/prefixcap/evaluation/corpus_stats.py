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


def matches_a_reference(caption: str, references: Iterable[str]) -> bool:
    """Whether `caption` equals one of `references`, case and punctuation aside: a caption no metric
    can fault."""
    words = simple_tokenize(caption)
    return any(words == simple_tokenize(reference) for reference in references)


def corpus_stats(
    captions: Sequence[str],
    train_captions: Iterable[str] | None = None,
    references: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Statistics named as in metrics.json; shares are percentages.

    - vocab_size: distinct words over all captions;
    - mean_length: words per caption;
    - unique_captions_pct: distinct captions / captions;
    - repetition_rate_pct: captions for which `has_repetition` holds;
    - novel_captions_pct: captions that are not a training caption (only with `train_captions`);
    - exact_match_pct: captions equal to one of their image's references (only with `references`,
      one list per caption): on a task with one right wording, such as `prefixcap synth`'s, the
      plainest sign that a model has learned.
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
    if references is not None:
        matches = map(matches_a_reference, captions, references)
        stats["exact_match_pct"] = 100 * sum(matches) / n
    return stats
