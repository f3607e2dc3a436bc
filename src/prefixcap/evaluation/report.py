"""A self-contained HTML report: metrics beside published figures, example captions with pictures.

Everything is inline (CSS, base64 JPEG thumbnails, a base64 PNG histogram), so the file opens
offline, from disk or as an e-mail attachment. Every piece of text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import random
from collections.abc import Sequence
from datetime import datetime, timezone

from prefixcap.errors import ImageLoadError
from prefixcap.evaluation.coco_metrics import simple_tokenize
from prefixcap.evaluation.corpus_stats import matches_a_reference
from prefixcap.evaluation.references import Sample
from prefixcap.evaluation.scoring import SIMPLE_SUFFIX, Evaluation
from prefixcap.inputs.loader import read_image

# Published figures on the COCO Karpathy test split: the two ClipCap rows from the ClipCap paper (Mokady et al.,
# 2021, arXiv:2111.09734), the re-run from issue #38 of rmokady/CLIP_prefix_caption; the BERTScore row from the
# linear-mapper baseline's evaluation (the README's; one reference per image).
PUBLISHED: dict[str, dict[str, float]] = {
    "ClipCap MLP, GPT-2 fine-tuned": {"BLEU-4": 32.15, "METEOR": 27.10, "CIDEr": 108.35, "SPICE": 20.12},
    "ClipCap transformer, GPT-2 frozen": {"BLEU-4": 33.53, "METEOR": 27.45, "CIDEr": 113.08, "SPICE": 21.05},
    "re-run of the transformer variant (ClipCap #38)": {"BLEU-4": 31.0, "CIDEr": 105.7, "SPICE": 20.4},
    "linear-mapper baseline (1 reference, selection split)": {
        "BERTScore-P": 0.912,
        "BERTScore-R": 0.902,
        "BERTScore-F1": 0.906,
    },
}
# Table rows in reading order: (metric key, how to print it).
METRIC_ROWS = [
    *((f"BLEU-{n}", "{:.2f}") for n in range(1, 5)),
    ("METEOR", "{:.2f}"),
    ("ROUGE-L", "{:.2f}"),
    ("CIDEr", "{:.2f}"),
    ("SPICE", "{:.2f}"),
    ("BERTScore-P", "{:.4f}"),
    ("BERTScore-R", "{:.4f}"),
    ("BERTScore-F1", "{:.4f}"),
    ("BERTScore-P (rescaled)", "{:.4f}"),
    ("BERTScore-R (rescaled)", "{:.4f}"),
    ("BERTScore-F1 (rescaled)", "{:.4f}"),
    ("CLIPScore", "{:.4f}"),
    ("RefCLIPScore", "{:.4f}"),
    ("CLIPScore (references)", "{:.4f}"),
]
STAT_ROWS = [
    ("num_captions", "captions", "{:,}"),
    ("vocab_size", "vocabulary (distinct words)", "{:,}"),
    ("mean_length", "mean length (words)", "{:.2f}"),
    ("unique_captions_pct", "distinct captions (%)", "{:.1f}"),
    ("repetition_rate_pct", "captions with a repeated word or trigram (%)", "{:.1f}"),
    ("novel_captions_pct", "novel captions, not in the train split (%)", "{:.1f}"),
]
# Per-image scores shown on each example card: (metric key, label, format).
CARD_SCORES = [
    ("CIDEr", "CIDEr", "{:.1f}"),
    ("CIDEr" + SIMPLE_SUFFIX, "CIDEr (simple)", "{:.1f}"),
    ("BERTScore-F1", "BERTScore-F1", "{:.3f}"),
    ("CLIPScore", "CLIP-S", "{:.3f}"),
    ("RefCLIPScore", "RefCLIP-S", "{:.3f}"),
]
RANKING_METRICS = ("CIDEr", "CIDEr" + SIMPLE_SUFFIX, "BERTScore-F1", "CLIPScore")  # the first one present ranks

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;padding:24px;
  color:#1d232a;background:#fafbfc}
h1{margin:0 0 4px}
h2{margin:32px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.meta{color:#5c6670;margin:0 0 4px}
.skipped{background:#fff6e0;border:1px solid #f0d48a;border-radius:6px;padding:8px 14px}
table{border-collapse:collapse;background:#fff;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde1e6;padding:5px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#eef1f4;font-weight:600;vertical-align:bottom;max-width:150px}
td.ours{font-weight:600;background:#f1f7ff}
.note{color:#5c6670;font-size:13px;max-width:900px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;overflow:hidden}
.card img,.noimg{width:100%;height:180px;object-fit:contain;display:block;background:#e9ecef}
.noimg{display:flex;align-items:center;justify-content:center;color:#7a848e;font-size:13px}
.body{padding:8px 12px}
.caption{font-weight:600;margin:0 0 6px}
.refs{margin:0;padding-left:18px;color:#48525c;font-size:13px}
.scores{margin-top:6px;font-size:12px;color:#2a5d9f}
.id{font-size:11px;color:#8a949e;word-break:break-all}
"""


def render_report(
    evaluation: Evaluation,
    *,
    title: str = "prefixcap evaluation",
    source: str | None = None,
    num_examples: int = 24,
    num_extremes: int = 6,
    thumbnail_size: int = 256,
    seed: int = 0,
) -> str:
    """The report as one HTML document.

    `source` says what was evaluated (model, data); `num_examples` random images (fixed `seed`)
    fill the grid, and `num_extremes` images each show the best and worst by per-image CIDEr.
    """
    samples = evaluation.samples
    thumbnails = _Thumbnails(thumbnail_size)
    ranking = next((name for name in RANKING_METRICS if name in evaluation.metrics), None)
    sections = [
        f"<h1>{_e(title)}</h1>",
        _meta(evaluation, source),
        _skipped(evaluation.skipped),
        "<h2>Metrics</h2>",
        _metrics_table(evaluation.metrics),
        _stats_table(evaluation.metrics),
        "<h2>Caption lengths</h2>",
        _length_histogram(samples),
    ]
    if ranking:
        scored = [s for s in samples if _finite(evaluation.per_image[s.image_id].get(ranking))]
        ranked = sorted(scored, key=lambda s: evaluation.per_image[s.image_id][ranking])
        sections += [
            f"<h2>Best {num_extremes} by per-image {_e(ranking)}</h2>",
            _grid(ranked[::-1][:num_extremes], evaluation, thumbnails),
            _worst(ranked, ranking, num_extremes, evaluation, thumbnails),
        ]
    chosen = sorted(random.Random(seed).sample(range(len(samples)), min(num_examples, len(samples))))
    sections += [f"<h2>{len(chosen)} random examples</h2>", _grid([samples[i] for i in chosen], evaluation, thumbnails)]
    body = "\n".join(section for section in sections if section)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _worst(ranked: Sequence[Sample], ranking: str, count: int, evaluation: Evaluation, thumbnails: _Thumbnails) -> str:
    """The `count` lowest-ranked captions among those that match none of their references: a
    caption equal to a reference is right, however low its score (CIDEr weighs words per image)."""
    wrong = [s for s in ranked if not matches_a_reference(s.caption, s.references)]
    if not wrong:
        return '<p class="note">Every caption equals one of its references.</p>'
    heading = f"Worst {min(count, len(wrong))} by per-image {_e(ranking)}"
    if len(wrong) < count:
        heading += f" (of {len(wrong)} caption{' that matches' if len(wrong) == 1 else 's that match'} no reference)"
    return f"<h2>{heading}</h2>" + _grid(wrong[:count], evaluation, thumbnails)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _finite(value: object) -> bool:
    """A real score, not a missing one or the NaN of an unreadable image."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _meta(evaluation: Evaluation, source: str | None) -> str:
    settings = evaluation.settings
    parts = [f"{len(evaluation.samples):,} images"]
    if "tokenization" in settings:
        parts.append("PTB tokenization" if settings["tokenization"] == "ptb" else "simple tokenization (no Java)")
    if "bertscore" in settings:
        parts.append(f"BERTScore: {settings['bertscore']['model']}, layer {settings['bertscore']['num_layers']}")
    if "clipscore" in settings:
        parts.append(f"CLIPScore: {settings['clipscore']['model']}")
    parts.append(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    lines = [f'<p class="meta">{_e(source)}</p>'] if source else []
    return "\n".join([*lines, f'<p class="meta">{_e(" · ".join(parts))}</p>'])


def _skipped(skipped: dict[str, str]) -> str:
    if not skipped:
        return ""
    items = "".join(f"<li><b>{_e(name)}</b>: {_e(reason)}</li>" for name, reason in skipped.items())
    return f'<div class="skipped">Not computed:<ul>{items}</ul></div>'


def _metrics_table(metrics: dict[str, float]) -> str:
    """Our scores beside the published ones; simple-tokenization rows carry their label."""
    head = "".join(f"<th>{_e(name)}</th>" for name in PUBLISHED)
    rows = []
    for key, fmt in METRIC_ROWS:
        name = next((name for name in (key, key + SIMPLE_SUFFIX) if name in metrics), None)
        published = [PUBLISHED[system].get(key) for system in PUBLISHED]
        if name is None and not any(value is not None for value in published):
            continue
        ours = fmt.format(metrics[name]) if name is not None and _finite(metrics[name]) else "—"
        cells = "".join(f"<td>{fmt.format(value) if value is not None else ''}</td>" for value in published)
        rows.append(f'<tr><td>{_e(name or key)}</td><td class="ours">{ours}</td>{cells}</tr>')
    return (
        f"<table><thead><tr><th>metric</th><th>this run</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="note">COCO metrics are x100, as in papers; published figures are on the COCO Karpathy test split '
        "(5,000 images, 5 references each), so they compare only with a run on that split. "
        "The linear-mapper baseline scored one truncated reference per image on the split it chose its checkpoint with, "
        "so its BERTScore is higher than a multi-reference one would be for the same captions. "
        "Simple-tokenization scores (no Java) are close to, but not comparable with, published ones. "
        'CLIPScore follows Hessel et al. (2021): w = 2.5, prompt "A photo depicts".</p>'
    )


def _stats_table(metrics: dict[str, float]) -> str:
    rows = "".join(
        f"<tr><td>{_e(label)}</td><td>{fmt.format(metrics[key])}</td></tr>"
        for key, label, fmt in STAT_ROWS
        if key in metrics
    )
    return f"<h2>Corpus statistics</h2><table><tbody>{rows}</tbody></table>" if rows else ""


def _length_histogram(samples: Sequence[Sample]) -> str:
    """Word counts of generated captions against those of the references, as a base64 PNG."""
    from matplotlib.figure import Figure

    generated = [len(simple_tokenize(s.caption).split()) for s in samples]
    references = [len(simple_tokenize(ref).split()) for s in samples for ref in s.references]
    bins = [edge - 0.5 for edge in range(max(generated + references) + 2)]  # one bar per word count
    figure = Figure(figsize=(7, 2.8), dpi=110, layout="tight")
    axes = figure.subplots()
    axes.hist(references, bins=bins, density=True, alpha=0.45, color="#8a949e", label="references")
    axes.hist(generated, bins=bins, density=True, histtype="step", linewidth=2, color="#2a5d9f", label="generated")
    axes.set_xlabel("caption length (words)")
    axes.set_ylabel("share of captions")
    axes.legend(frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="histogram of caption lengths" src="data:image/png;base64,{data}">'


class _Thumbnails:
    """JPEG data URIs of the shown images, each read once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.cache: dict[str, str | None] = {}

    def __call__(self, image: str | None) -> str | None:
        if image is None:
            return None
        if image not in self.cache:
            try:
                picture = read_image(image)
            except ImageLoadError:
                self.cache[image] = None
            else:
                picture.thumbnail((self.size, self.size))
                buffer = io.BytesIO()
                picture.save(buffer, format="JPEG", quality=80)
                self.cache[image] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        return self.cache[image]


def _grid(samples: Sequence[Sample], evaluation: Evaluation, thumbnails: _Thumbnails) -> str:
    return (
        '<div class="grid">'
        + "".join(_card(s, evaluation.per_image[s.image_id], thumbnails) for s in samples)
        + "</div>"
    )


def _card(sample: Sample, scores: dict[str, float], thumbnails: _Thumbnails) -> str:
    """One example: picture, generated caption, references, and its per-image scores."""
    uri = thumbnails(sample.image)
    picture = (
        f'<img alt="{_e(sample.image_id)}" src="{uri}">' if uri else '<div class="noimg">image not available</div>'
    )
    refs = "".join(f"<li>{_e(ref)}</li>" for ref in sample.references)
    line = " · ".join(
        f"{label} {fmt.format(scores[key])}" for key, label, fmt in CARD_SCORES if _finite(scores.get(key))
    )
    return (
        f'<div class="card">{picture}<div class="body"><p class="caption">{_e(sample.caption)}</p>'
        f'<ul class="refs">{refs}</ul><div class="scores">{_e(line)}</div>'
        f'<div class="id">{_e(sample.image_id)}</div></div></div>'
    )
