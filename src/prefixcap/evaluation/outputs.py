"""What an evaluation writes: results.json, metrics.json, per_image.json and report.html.

Apart from scoring so that the report, which reads an `Evaluation`, and the scoring, which makes
one, do not import each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefixcap.evaluation.references import References, Sample
from prefixcap.evaluation.report import render_report
from prefixcap.evaluation.scoring import Evaluation, ScoreConfig, score_samples
from prefixcap.system.atomic import write_atomic


def score_and_write(
    samples: list[Sample],
    references: References,
    config: ScoreConfig,
    out_dir: Path,
    *,
    source: str,
    num_examples: int = 24,
) -> Evaluation:
    """Score, then write metrics.json, per_image.json and report.html into `out_dir`."""
    evaluation = score_samples(samples, config, train_captions=references.train_captions)
    write_outputs(out_dir, evaluation, source=source, num_examples=num_examples)
    return evaluation


EVALUATION_DIRECTORY = "prefixcap evaluation"


def is_evaluation_dir(path: Path) -> bool:
    """Whether `path` holds an earlier `evaluate`'s outputs (results.json comes first)."""
    return (path / "results.json").is_file()


def default_evaluation_dir(model: str | Path) -> Path:
    """evaluation/NAME, a folder per model, so that evaluating a second model keeps the first's
    report. NAME is a model folder's last two path parts (run/best -> run-best), or a registered
    name or hub id with "/" as "-"."""
    path = Path(model)
    parts = path.resolve().parts[-2:] if path.exists() else path.parts
    return Path("evaluation") / "-".join(part for part in parts if part.strip("/\\."))


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as aligned `name  value` lines (what `score` and `evaluate` print)."""
    width = max(map(len, metrics), default=0)
    return "\n".join(
        f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}"
        for name, value in metrics.items()
    )


def write_outputs(out_dir: str | Path, evaluation: Evaluation, **report_kwargs: Any) -> Path:
    """Write metrics.json, per_image.json and the self-contained report.html into `out_dir`."""
    out = Path(out_dir)
    write_json(out / "metrics.json", evaluation.summary())
    per_image = [
        {"image_id": s.image_id, "caption": s.caption, **evaluation.per_image[s.image_id]} for s in evaluation.samples
    ]
    write_json(out / "per_image.json", per_image)
    write_atomic(out / "report.html", render_report(evaluation, **report_kwargs))
    return out


def write_json(path: Path, value: Any) -> None:
    """Strict JSON (NaN, e.g. the CLIPScore of an unreadable image, becomes null), written atomically."""
    write_atomic(path, json.dumps(_finite(value), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
