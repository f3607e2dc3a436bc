"""CIDEr-D as a per-sample reward, with document frequencies fixed by a training corpus.

Self-critical training (Rennie et al., 2017) rewards each sampled caption with its CIDEr-D against
its image's references. pycocoevalcap's `Cider` takes the document frequencies from the references
of the set it scores, which for a batch of a few images makes every n-gram look rare; the standard
training code (ruotianluo/self-critical.pytorch, `CiderD(df="corpus")`) computes them once from the
training references instead, and so does `CiderD` here. The formula is pycocoevalcap's
`CiderScorer.compute_cider`, which already is CIDEr-D: tf-idf n-gram vectors (n = 1..4), each
candidate n-gram's weight clipped to the reference's (min), a Gaussian length penalty with
sigma = 6, the mean over n, the mean over references, x10. Like it, the "length" in the penalty
is the number of bigrams (words - 1), and n-grams unseen in the corpus get document frequency 1.

Text is `simple_tokenize`d (no Java), as the training loop's validation scores it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from prefixcap.evaluation.coco_metrics import simple_tokenize

Ngram = tuple[str, ...]


def ngram_counts(tokens: Sequence[str], n: int) -> Counter[Ngram]:
    """Counts of every 1..n-gram of `tokens`."""
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


@dataclass
class _Vector:
    """A caption's tf-idf n-gram weights, the norm of each n-gram order, and its length in bigrams."""

    weights: dict[Ngram, float]
    norms: np.ndarray  # [n]
    length: int


class CiderD:
    """CIDEr-D scores of sampled captions, with document frequencies from `corpus`.

    >>> reward = CiderD(train_references)  # once: [[ref, ref, ...] per training image]
    >>> reward(samples, batch_references)  # k samples per image, image-major -> array [B * k]
    """

    def __init__(
        self,
        corpus: Iterable[Sequence[str]],
        *,
        n: int = 4,
        sigma: float = 6.0,
        tokenize: Callable[[str], str] = simple_tokenize,
    ) -> None:
        self.n = n
        self.sigma = sigma
        self.tokenize = tokenize
        document_frequency: Counter[Ngram] = Counter()
        documents = 0
        # one document per image: the n-grams of any of its references (COCO's 113k images: about 15 s)
        images = tqdm(corpus, desc="CIDEr-D document frequencies", unit="image", leave=False, disable=None)
        for references in images:
            documents += 1
            document_frequency.update({g for ref in references for g in ngram_counts(self._tokens(ref), n)})
        if documents == 0:
            raise ValueError("CiderD needs a corpus of at least one image's references")
        # idf = log(images) - log(df); an n-gram unseen in the corpus counts as df = 1.
        self.log_documents = math.log(documents)
        self._log_df = {ngram: math.log(count) for ngram, count in document_frequency.items()}

    def _tokens(self, text: str) -> list[str]:
        return self.tokenize(text).split()

    def _vector(self, text: str) -> _Vector:
        tokens = self._tokens(text)
        weights = {}
        squares = np.zeros(self.n)
        for ngram, count in ngram_counts(tokens, self.n).items():
            weight = count * (self.log_documents - self._log_df.get(ngram, 0.0))
            weights[ngram] = weight
            squares[len(ngram) - 1] += weight * weight
        return _Vector(weights, np.sqrt(squares), max(len(tokens) - 1, 0))

    def _similarity(self, candidate: _Vector, reference: _Vector) -> np.ndarray:
        """[n] clipped cosine similarities per n-gram order, times the length penalty."""
        overlap = np.zeros(self.n)
        for ngram, weight in candidate.weights.items():
            ref_weight = reference.weights.get(ngram)
            if ref_weight is not None:
                overlap[len(ngram) - 1] += min(weight, ref_weight) * ref_weight
        norms = candidate.norms * reference.norms
        cosine = np.divide(overlap, norms, out=overlap.copy(), where=norms != 0)
        penalty = math.exp(-((candidate.length - reference.length) ** 2) / (2 * self.sigma**2))
        return cosine * penalty

    def __call__(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each candidate: `candidates` holds k per image, image after image (k =
        len(candidates) / len(references)); returns a float64 array aligned with `candidates`.
        Each image's references are vectorised once and shared by its k candidates."""
        if not references or len(candidates) % len(references):
            raise ValueError(
                f"{len(candidates)} candidates for {len(references)} images: need the same number per image"
            )
        if any(not refs for refs in references):
            raise ValueError("every image needs at least one reference")
        k = len(candidates) // len(references)
        scores = np.empty(len(candidates))
        for image, refs in enumerate(references):
            ref_vectors = [self._vector(ref) for ref in refs]
            for index in range(image * k, (image + 1) * k):
                candidate = self._vector(candidates[index])
                total = sum(self._similarity(candidate, ref) for ref in ref_vectors)
                scores[index] = 10.0 * float(np.mean(total)) / len(refs)
        return scores
