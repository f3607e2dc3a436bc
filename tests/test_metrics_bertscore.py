"""BERTScore through bert-score's real code path, with a tiny RoBERTa built locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefixcap.errors import UserError
from prefixcap.evaluation.bertscore import BERTScoreConfig, bertscore
from prefixcap.testing import build_roberta

CANDIDATES = ["a red shape on a blue background", "two dogs playing with a ball", "a plate of food"]
REFERENCES = [
    ["a red shape on a white background", "a red circle on blue"],
    ["dogs playing in the grass", "two dogs with a ball", "a dog"],
    ["a plate of rice and broccoli"],
]


def build_tiny_roberta(directory: Path) -> Path:
    return build_roberta(directory, CANDIDATES + [ref for refs in REFERENCES for ref in refs])


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_roberta(tmp_path_factory.mktemp("bertscore") / "roberta")


@pytest.fixture(scope="module")
def baseline_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rescale baseline in bert-score's TSV layout: one row per layer, columns P, R, F."""
    path = tmp_path_factory.mktemp("baseline") / "tiny.tsv"
    rows = [f"{layer},{0.5 + layer / 100},{0.4 + layer / 100},{0.45 + layer / 100}" for layer in range(4)]
    path.write_text("LAYER,P,R,F\n" + "\n".join(rows) + "\n")
    return path


def test_multi_reference_scores_are_bert_scores_best_match(roberta_dir: Path) -> None:
    import bert_score

    result = bertscore(CANDIDATES, REFERENCES, BERTScoreConfig(model_type=str(roberta_dir), num_layers=2, device="cpu"))
    expected = bert_score.score(CANDIDATES, REFERENCES, model_type=str(roberta_dir), num_layers=2, device="cpu")
    for ours, theirs in zip((result.precision, result.recall, result.f1), expected):
        torch.testing.assert_close(ours, theirs)

    # Best match: each caption's F1 is the largest of its single-reference F1s.
    pairs = [(c, r) for c, refs in zip(CANDIDATES, REFERENCES) for r in refs]
    *_, single_f1 = bert_score.score(
        [c for c, _ in pairs], [r for _, r in pairs], model_type=str(roberta_dir), num_layers=2
    )
    best = torch.stack([part.max() for part in single_f1.split([len(refs) for refs in REFERENCES])])
    torch.testing.assert_close(result.f1, best)
    assert len(set(result.f1.tolist())) == len(CANDIDATES)  # real, distinct scores


def test_rescaled_scores_equal_bert_scores_rescaling(roberta_dir: Path, baseline_file: Path) -> None:
    import bert_score

    config = BERTScoreConfig(model_type=str(roberta_dir), num_layers=2, baseline_path=str(baseline_file), device="cpu")
    result = bertscore(CANDIDATES, REFERENCES, config)
    expected = bert_score.score(
        CANDIDATES,
        REFERENCES,
        model_type=str(roberta_dir),
        num_layers=2,
        lang="en",
        rescale_with_baseline=True,
        baseline_path=str(baseline_file),
        device="cpu",
    )
    assert result.rescaled is not None
    for ours, theirs in zip(result.rescaled, expected):
        torch.testing.assert_close(ours, theirs)
    summary = result.summary()
    assert summary["BERTScore-F1 (rescaled)"] == pytest.approx(expected[2].mean().item())
    assert summary["BERTScore-F1"] != summary["BERTScore-F1 (rescaled)"]


def test_without_a_baseline_only_raw_scores(roberta_dir: Path, capsys: pytest.CaptureFixture) -> None:
    result = bertscore(
        CANDIDATES[:1], REFERENCES[:1], BERTScoreConfig(model_type=str(roberta_dir), num_layers=1, device="cpu")
    )
    assert result.rescaled is None
    assert set(result.summary()) == {"BERTScore-P", "BERTScore-R", "BERTScore-F1"}
    assert "BERTScore rescaling skipped" in capsys.readouterr().err


def test_unknown_model_needs_a_layer_and_missing_model_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--bertscore-layers"):
        bertscore(CANDIDATES, REFERENCES, BERTScoreConfig(model_type=str(tmp_path)))
    with pytest.raises(UserError, match="cannot load BERTScore model"):
        bertscore(CANDIDATES, REFERENCES, BERTScoreConfig(model_type=str(tmp_path / "missing"), num_layers=1))


def test_a_model_asking_for_custom_code_is_refused_and_never_run(
    roberta_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bert-score loads --bertscore-model itself, without trust_remote_code; a local
    folder whose config has auto_map is refused before it could ask on stdin to run its Python."""
    import json
    import shutil
    import sys

    from transformers import dynamic_module_utils

    from prefixcap.errors import UserError

    model = Path(shutil.copytree(roberta_dir, tmp_path / "model"))
    marker = tmp_path / "ran"
    config = json.loads((model / "config.json").read_text())
    custom = {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.Evil"}}
    (model / "config.json").write_text(json.dumps({**config, **custom}))
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(UserError, match="auto_map"):
        bertscore(CANDIDATES, REFERENCES, BERTScoreConfig(model_type=str(model), num_layers=2, device="cpu"))
    assert not asked and not marker.exists()
