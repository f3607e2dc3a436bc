"""Score generated captions with every metric (`evaluation.outputs` writes the results).

Metrics a user names must run, and their failures are one-line errors. With no names, every
metric that can run here does, and each one that cannot, or fails for any reason, is skipped with
a one-line reason: one metric never costs the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.evaluation.bertscore import BERTScoreConfig, bertscore
from prefixcap.evaluation.clipscore import PROMPT, REFERENCES_CLIPSCORE, CLIPScorer, W
from prefixcap.evaluation.coco_metrics import COCO_METRICS, coco_scores
from prefixcap.evaluation.corpus_stats import corpus_stats
from prefixcap.evaluation.notices import notice
from prefixcap.evaluation.references import Sample
from prefixcap.inputs.loader import read_image

ALL_METRICS = (*COCO_METRICS, "bertscore", "clipscore", "stats")
SIMPLE_SUFFIX = " (simple tokenization)"  # on the names of metrics computed without PTB tokenisation
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # the ViT-B/32 that Hessel et al. used
_IMAGE_PROBES = 8  # images tried before loading CLIP, to skip CLIPScore early when none is there


@dataclass
class ScoreConfig:
    metrics: tuple[str, ...] | None = None  # None: all that can run; named metrics must run
    java: bool | None = None  # None: use Java when it is on PATH
    bertscore: BERTScoreConfig = field(default_factory=BERTScoreConfig)
    clip_model: str = DEFAULT_CLIP_MODEL  # hub id or dir of a full CLIPModel, for CLIPScore
    device: str | None = None  # for BERTScore and CLIPScore; None: CUDA when available
    batch_size: int = 64  # sentences or images per model batch

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics or ()) - set(ALL_METRICS))
        if unknown:
            raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {','.join(ALL_METRICS)}")


@dataclass
class Evaluation:
    samples: list[Sample]  # what was scored, in order
    metrics: dict[str, float] = field(default_factory=dict)  # corpus scores, e.g. "BLEU-4", "CLIPScore"
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # image id -> metric -> score
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it did not run
    settings: dict[str, Any] = field(default_factory=dict)  # how the metrics were computed

    def summary(self) -> dict[str, Any]:
        """The content of metrics.json."""
        return {
            "num_images": len(self.samples),
            "metrics": self.metrics,
            "skipped": self.skipped,
            "settings": self.settings,
        }

    def add_per_image(self, name: str, values: Sequence[float]) -> None:
        for scores, value in zip(self.per_image.values(), values):
            scores[name] = value


def score_samples(
    samples: Sequence[Sample], config: ScoreConfig, *, train_captions: Sequence[str] | None = None
) -> Evaluation:
    """Run the configured metrics on `samples` (one generated caption per image)."""
    if not samples:
        raise UserError("nothing to score: no samples")
    wanted = config.metrics or ALL_METRICS
    explicit = config.metrics is not None
    evaluation = Evaluation(list(samples), per_image={s.image_id: {} for s in samples})

    coco = [name for name in wanted if name in COCO_METRICS]
    if coco:
        with _optional("COCO metrics", explicit, evaluation):
            _coco(evaluation, coco, config)
    if "bertscore" in wanted:
        with _optional("BERTScore", explicit, evaluation):
            _bertscore(evaluation, config)
    if "clipscore" in wanted:
        with _optional("CLIPScore", explicit, evaluation):
            _clipscore(evaluation, config)
    if "stats" in wanted:
        evaluation.metrics |= corpus_stats(
            [s.caption for s in samples], train_captions, [s.references for s in samples]
        )
        evaluation.settings["stats"] = {"novelty": "vs the train split" if train_captions else "no train split known"}
    return evaluation


def _coco(evaluation: Evaluation, metrics: list[str], config: ScoreConfig) -> None:
    """BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE in one pass (they share the tokenisation)."""
    predictions = {s.image_id: s.caption for s in evaluation.samples}
    references = {s.image_id: s.references for s in evaluation.samples}
    result = coco_scores(predictions, references, java=config.java, metrics=metrics, strict=config.metrics is not None)
    # Simple-tokenisation numbers get other names, so nobody compares them with papers by mistake.
    suffix = "" if result.tokenization == "ptb" else SIMPLE_SUFFIX
    evaluation.metrics |= {name + suffix: value for name, value in result.corpus.items()}
    for image_id, scores in result.per_image.items():
        evaluation.per_image[image_id] |= {name + suffix: value for name, value in scores.items()}
    evaluation.skipped |= result.skipped
    evaluation.settings["tokenization"] = result.tokenization


def _bertscore(evaluation: Evaluation, config: ScoreConfig) -> None:
    samples = evaluation.samples
    result = bertscore([s.caption for s in samples], [s.references for s in samples], config.bertscore)
    evaluation.metrics |= result.summary()
    evaluation.add_per_image("BERTScore-F1", result.f1.tolist())
    baseline = (config.bertscore.baseline_path or "bert-score's own") if result.rescaled is not None else None
    evaluation.settings["bertscore"] = {
        "model": config.bertscore.model_type,
        "num_layers": result.num_layers,
        "idf": False,
        "references": "all, best match per caption",
        "rescale_baseline": baseline,
    }


def _clipscore(evaluation: Evaluation, config: ScoreConfig) -> None:
    samples = evaluation.samples
    _check_images_present([s.image for s in samples])
    scorer = CLIPScorer.from_pretrained(config.clip_model, device=config.device, batch_size=config.batch_size)
    result = scorer.score([s.image for s in samples], [s.caption for s in samples], [s.references for s in samples])
    evaluation.metrics |= result.summary()
    evaluation.add_per_image("CLIPScore", result.clip_s.tolist())
    evaluation.add_per_image("RefCLIPScore", result.ref_clip_s.tolist())
    evaluation.add_per_image(REFERENCES_CLIPSCORE, result.references_clip_s.tolist())
    evaluation.settings["clipscore"] = {"model": config.clip_model, "w": W, "prompt": PROMPT}


def _check_images_present(images: Sequence[str | None]) -> None:
    """Fail fast, before loading CLIP, when the first images cannot be read (no or wrong --images)."""
    known = [image for image in images if image]
    if not known:
        raise UserError("CLIPScore needs the images, and the references name none; pass --images DIR")
    errors = []
    for image in known[:_IMAGE_PROBES]:
        try:
            read_image(image)
            return
        except ImageLoadError as error:
            errors.append(str(error))
    raise UserError(f"CLIPScore needs the images, and none could be read (e.g. {errors[0]}); pass --images DIR")


@contextlib.contextmanager
def _optional(name: str, explicit: bool, evaluation: Evaluation) -> Iterator[None]:
    """Run one metric. Its failure, whatever the cause (a missing model, a tokenizer without a pad
    token, a crashed JVM), is one line: an error when the user named it, else a skip."""
    try:
        yield
    except Exception as error:
        if explicit and isinstance(error, UserError):
            raise
        reason = str(error) if isinstance(error, UserError) else " ".join(f"{type(error).__name__}: {error}".split())
        if explicit:
            raise UserError(f"{name} failed ({reason})") from None
        notice(f"{name} skipped: {reason}")
        evaluation.skipped[name] = reason
