"""CIDEr-D rewards: parity with pycocoevalcap's CiderScorer when both use the same corpus document frequencies."""

from __future__ import annotations

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from prefixcap.evaluation.cider import CiderD
from prefixcap.evaluation.coco_metrics import simple_tokenize

# The training corpus: the document frequencies come from here, never from the scored batch.
CORPUS = [
    ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.", "Man on a surfboard."],
    ["Two dogs playing with a ball in the grass.", "Dogs chase a red ball on a lawn.", "Two puppies play outside."],
    ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a white plate."],
    ["A cat sitting on a couch.", "The cat's asleep on the sofa.", "A grey cat lies on a couch."],
    ["A red bus driving down a city street.", "A double-decker bus on the road."],
    ["A man riding a horse on a beach.", "A rider and his horse by the sea.", "A horse on the sand."],
]
# The scored batch: three images (two from the corpus, one not), three samples each, image-major;
# with an empty sample, a one-word one, a repeated word and words the corpus never saw.
REFERENCES = [CORPUS[0], CORPUS[3], ["A small boat on a calm lake.", "A rowing boat floats on the water."]]
CANDIDATES = [
    "A man riding a wave on a surfboard.",
    "a surfer surfer surfer on a wave",
    "",
    "A cat on a couch.",
    "cat",
    "A grey cat sleeping on the sofa next to a window.",
    "A boat on a lake.",
    "A zeppelin over a lake.",
    "A man riding a wave on top of a surfboard.",
]


class CorpusCiderScorer(CiderScorer):
    """pycocoevalcap's CIDEr-D, with the document frequencies and log(images) of a fixed corpus:
    its `compute_cider` sets `ref_len` from the scored set, which this ignores."""

    ref_len = property(lambda self: self.corpus_ref_len, lambda self, value: None)

    def __init__(self, corpus: list[list[str]]) -> None:
        super().__init__()
        for refs in corpus:
            self.cook_append(None, [simple_tokenize(ref) for ref in refs])
        self.compute_doc_freq()
        self.corpus_ref_len = np.log(float(len(self.crefs)))
        self.crefs, self.ctest = [], []

    def scores(self, candidates: list[str], references: list[list[str]]) -> np.ndarray:
        k = len(candidates) // len(references)
        for index, candidate in enumerate(candidates):
            self.cook_append(simple_tokenize(candidate), [simple_tokenize(ref) for ref in references[index // k]])
        return np.array(self.compute_cider())


def test_per_sample_rewards_match_pycocoevalcap_with_corpus_document_frequencies():
    rewards = CiderD(CORPUS)(CANDIDATES, REFERENCES)
    expected = CorpusCiderScorer(CORPUS).scores(CANDIDATES, REFERENCES)
    assert rewards.shape == (len(CANDIDATES),) and rewards.dtype == np.float64
    np.testing.assert_allclose(rewards, expected, rtol=1e-12, atol=1e-12)
    assert rewards[2] == rewards[8] == 0.0  # the empty sample; another image's caption
    assert rewards[0] > rewards[1] > 0 and rewards[6] > rewards[7] > 0  # a close caption beats repetition, a zeppelin
    assert len(set(np.round(rewards, 9))) == len(rewards) - 1  # the vector, not just its mean, is compared


def test_document_frequencies_come_from_the_corpus_not_the_batch():
    """Scored alone, the batch would give other idf weights: pycocoevalcap's Cider (df from the
    scored set's references) agrees with CiderD only when the corpus is that set."""
    candidates = CANDIDATES[::3]  # one per image, as Cider scores
    batch_df = CiderD(REFERENCES)(candidates, REFERENCES)
    _, cider = Cider().compute_score(
        {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(REFERENCES)},
        {i: [simple_tokenize(c)] for i, c in enumerate(candidates)},
    )
    np.testing.assert_allclose(batch_df, cider, rtol=1e-12)
    assert not np.allclose(CiderD(CORPUS)(candidates, REFERENCES), batch_df)


def test_cider_d_clips_and_penalises_length():
    """Repeating a reference's words does not pay (clipping), and a longer copy scores less (sigma = 6)."""
    reward = CiderD(CORPUS)
    refs = [["a cat sitting on a couch"]]
    exact, repeated, padded = reward(
        ["a cat sitting on a couch", "a cat cat cat sitting on a couch", "a cat sitting on a couch " * 3], refs
    )
    assert exact > repeated and exact > padded


def test_rejects_batches_that_do_not_split_evenly():
    reward = CiderD(CORPUS)
    with pytest.raises(ValueError, match="same number per image"):
        reward(CANDIDATES[:4], REFERENCES)
    with pytest.raises(ValueError, match="at least one reference"):
        reward(["a cat"], [[]])
    with pytest.raises(ValueError, match="at least one image"):
        CiderD([])
