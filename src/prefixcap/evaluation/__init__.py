"""Caption evaluation as papers do it: COCO metrics, BERTScore, CLIPScore, corpus statistics, a report.

The training loop's validation uses `coco_scores(predictions, references, java=False,
metrics=("bleu", "cider"))`: pycocoevalcap's scorers on `simple_tokenize`d text, no JVM.
"""

from prefixcap.evaluation.bertscore import BERTScoreConfig, BERTScoreResult, bertscore
from prefixcap.evaluation.cider import CiderD
from prefixcap.evaluation.clipscore import (
    CLIPScorer,
    CLIPScoreResult,
    clip_s,
    ref_clip_s,
)
from prefixcap.evaluation.coco_metrics import (
    COCO_METRICS,
    CocoScores,
    coco_scores,
    ptb_tokenize,
    simple_tokenize,
)
from prefixcap.evaluation.corpus_stats import corpus_stats, has_repetition
from prefixcap.evaluation.generate import caption_records
from prefixcap.evaluation.outputs import score_and_write, write_json, write_outputs
from prefixcap.evaluation.references import (
    References,
    Sample,
    choose_split,
    load_references,
    load_results,
    match_samples,
    results_json,
)
from prefixcap.evaluation.report import render_report
from prefixcap.evaluation.scoring import (
    ALL_METRICS,
    Evaluation,
    ScoreConfig,
    score_samples,
)

__all__ = [
    "ALL_METRICS",
    "BERTScoreConfig",
    "BERTScoreResult",
    "CLIPScoreResult",
    "CLIPScorer",
    "COCO_METRICS",
    "CiderD",
    "CocoScores",
    "Evaluation",
    "References",
    "Sample",
    "ScoreConfig",
    "bertscore",
    "caption_records",
    "choose_split",
    "clip_s",
    "coco_scores",
    "corpus_stats",
    "has_repetition",
    "load_references",
    "load_results",
    "match_samples",
    "ptb_tokenize",
    "ref_clip_s",
    "render_report",
    "results_json",
    "score_and_write",
    "score_samples",
    "simple_tokenize",
    "write_json",
    "write_outputs",
]
