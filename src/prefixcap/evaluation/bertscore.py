"""BERTScore against all references of each image, raw and baseline-rescaled, via bert-score.

The defaults are bert-score's own for English (the setting of the linear-mapper baseline's published
BERTScore, see the README): roberta-large, layer 17, no idf. That baseline scored against one reference; here every reference counts and a
caption gets its best match, which is what bert-score does with a list of references.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefixcap.errors import UserError
from prefixcap.evaluation.notices import notice
from prefixcap.system.extras import require


@dataclass
class BERTScoreConfig:
    model_type: str = "roberta-large"  # hub id or local dir, loaded by bert-score with AutoModel
    num_layers: int | None = None  # representation layer; None: bert-score's tuned layer (17 for roberta-large)
    baseline_path: str | None = None  # rescale baseline TSV; None: the one bert-score ships for model_type
    batch_size: int = 64  # sentence pairs per forward pass
    device: str | None = None  # None: CUDA when available


@dataclass
class BERTScoreResult:
    precision: torch.Tensor  # [N] raw P per caption (best over its references)
    recall: torch.Tensor  # [N] raw R
    f1: torch.Tensor  # [N] raw F1
    rescaled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (P, R, F1) rescaled, None without a baseline
    num_layers: int  # the layer actually used

    def summary(self) -> dict[str, float]:
        """Corpus means, named as in metrics.json."""
        names = ("BERTScore-P", "BERTScore-R", "BERTScore-F1")
        out = {name: float(values.mean()) for name, values in zip(names, (self.precision, self.recall, self.f1))}
        if self.rescaled is not None:
            out |= {f"{name} (rescaled)": float(values.mean()) for name, values in zip(names, self.rescaled)}
        return out


def bertscore(
    candidates: Sequence[str], references: Sequence[Sequence[str]], config: BERTScoreConfig
) -> BERTScoreResult:
    """Score each candidate against its references; rescale with the baseline when there is one.

    The model runs once: rescaling is bert-score's affine map (x - b) / (1 - b) of the raw
    scores, with b read by bert-score from its baseline file for the chosen layer.
    """
    require("eval", "bert_score", feature="BERTScore")
    from bert_score import BERTScorer
    from bert_score.utils import model2layers

    from prefixcap.model.hf_loading import refuse_remote_code

    refuse_remote_code(config.model_type)  # bert-score's loaders take no trust_remote_code

    num_layers = config.num_layers if config.num_layers is not None else model2layers.get(config.model_type)
    if num_layers is None:
        raise UserError(f"bert-score has no default layer for {config.model_type!r}; pass --bertscore-layers")
    try:
        scorer = BERTScorer(
            model_type=config.model_type,
            num_layers=num_layers,
            lang="en",  # only used to find the shipped baseline file
            baseline_path=config.baseline_path,
            batch_size=config.batch_size,
            device=config.device,
        )
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"cannot load BERTScore model {config.model_type!r} ({reason})") from None
    precision, recall, f1 = scorer.score(
        list(candidates), [list(refs) for refs in references], batch_size=config.batch_size
    )
    try:
        with warnings.catch_warnings():  # bert-score wraps pandas' read-only array; harmless here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            baseline = scorer.baseline_vals  # [3]: P, R, F1 baselines of this model and layer
    except (ValueError, IndexError):  # no baseline file, or no row for this layer
        notice(
            f"BERTScore rescaling skipped: no baseline for {config.model_type!r} at layer {num_layers} "
            "(pass --bertscore-baseline FILE to use your own)"
        )
        rescaled = None
    else:
        rescaled = tuple((values - b) / (1 - b) for values, b in zip((precision, recall, f1), baseline))
    return BERTScoreResult(precision, recall, f1, rescaled, num_layers)
