"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) through pycocoevalcap.

The numbers are those of pycocoevalcap's `COCOEvalCap` (PTB tokenisation, the same scorer
classes), reported x100 as papers do. Two things degrade gracefully instead of crashing:

- no Java on PATH: METEOR, SPICE and the PTB tokeniser need it, so BLEU, ROUGE-L and CIDEr-D
  run on `simple_tokenize`d text instead, and the result says so (`tokenization="simple"`).
  The training loop uses this path on purpose: it is fast and needs no JVM.
- SPICE needs Stanford CoreNLP, which pycocoevalcap downloads on first use; offline, or when
  its jar fails, SPICE is skipped with a one-line reason and the other metrics are reported.
  Offline means HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: then nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.error
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from prefixcap.errors import UserError
from prefixcap.evaluation.notices import captured_output, notice

COCO_METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
JAVA_METRICS = frozenset({"meteor", "spice"})  # these have no Python implementation

K = TypeVar("K", bound=Hashable)
_WORD = re.compile(r"[^\W_]+")  # a run of letters or digits, in any script


@dataclass
class CocoScores:
    """Corpus and per-image COCO metrics, x100, keyed like papers ("BLEU-4", "CIDEr")."""

    corpus: dict[str, float] = field(default_factory=dict)  # metric name -> corpus score
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # image id -> name -> score
    tokenization: str = "ptb"  # "ptb" (comparable with papers) or "simple" (no Java)
    skipped: dict[str, str] = field(default_factory=dict)  # metric name -> why it did not run


def simple_tokenize(text: str) -> str:
    """Lowercased words, punctuation dropped: PTB-like tokens without Java.

    Differs from PTB only on contractions and hyphenation ("dog's" -> "dog s", PTB: "dog 's"),
    so scores are close to, but not comparable with, published ones.
    """
    return " ".join(_WORD.findall(text.lower()))


def ptb_tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """pycocoevalcap's Java PTB tokenisation of `captions`, in one JVM run.

    Whitespace is normalised first: the tokeniser works line by line, so a stray "\\r" in a
    caption would shift every later caption onto the wrong image. Empty captions never reach
    it, because it drops trailing empty lines.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    normalised = {key: [" ".join(text.split()) for text in texts] for key, texts in captions.items()}
    non_empty = {key: [{"caption": t} for t in texts if t] for key, texts in normalised.items()}
    with captured_output():  # its "tokenized N tokens" line
        tokenized = PTBTokenizer().tokenize({key: value for key, value in non_empty.items() if value})
    # Put the empty captions back in their places.
    out: dict[K, list[str]] = {}
    for key, texts in normalised.items():
        tokens = iter(tokenized.get(key, []))
        out[key] = [next(tokens) if text else "" for text in texts]
    return out


def coco_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    java: bool | None = None,
    metrics: Iterable[str] = COCO_METRICS,
    strict: bool = False,
) -> CocoScores:
    """Score one caption per image against its references with pycocoevalcap's scorers.

    `java=None` uses Java when it is on PATH; `java=False` forces the simple-tokenisation path
    (no METEOR/SPICE). `metrics` is a subset of `COCO_METRICS`. A metric that cannot run here is
    skipped with a one-line reason, or, when `strict` (the user named it), a UserError saying why.
    """
    wanted = list(dict.fromkeys(metrics))
    unknown = sorted(set(wanted) - set(COCO_METRICS))
    if unknown:
        raise ValueError(f"unknown COCO metrics {unknown}; choose from {list(COCO_METRICS)}")
    missing = [image_id for image_id in predictions if not references.get(image_id)]
    if missing:
        raise UserError(f"{len(missing)} image(s) have no reference captions, e.g. {missing[0]!r}")
    has_java = shutil.which("java") is not None
    if java and not has_java:
        raise UserError("java is not on PATH; install Java 8+ or score without it (java=False)")
    auto = java is None  # use Java when it is on PATH, and say so when it is not
    java = has_java if auto else java
    result = CocoScores(tokenization="ptb" if java else "simple")
    if not java:
        for name in sorted(JAVA_METRICS.intersection(wanted)):  # raises when strict
            reason = "needs Java, which is not on PATH" if not has_java else "Java disabled"
            _cannot_run(result.skipped, name.upper(), reason, strict=strict)
        wanted = [name for name in wanted if name not in JAVA_METRICS]
        if auto:
            notice(
                "Java not found on PATH: METEOR and SPICE skipped; BLEU, ROUGE-L and CIDEr-D use simple tokenization "
                "(close to, not comparable with, published numbers). Install Java for the standard pipeline."
            )

    # Tokenise references and predictions together (one JVM start), keyed apart.
    ids = list(predictions)
    captions = {("ref", i): list(references[i]) for i in ids} | {("res", i): [predictions[i]] for i in ids}
    if java:
        tokenized = ptb_tokenize(captions)
    else:
        tokenized = {key: [simple_tokenize(t) for t in texts] for key, texts in captions.items()}
    gts = {i: tokenized["ref", i] for i in ids}
    res = {i: tokenized["res", i] for i in ids}

    result.per_image = {i: {} for i in ids}
    for name in wanted:
        for metric, corpus, per_image in _run_scorer(name, gts, res, result.skipped, strict):
            result.corpus[metric] = 100 * float(corpus)
            for image_id, value in zip(ids, per_image):
                result.per_image[image_id][metric] = 100 * float(value)
    return result


def _run_scorer(
    name: str, gts: dict[str, list[str]], res: dict[str, list[str]], skipped: dict[str, str], strict: bool
) -> list[tuple[str, float, Sequence[float]]]:
    """(metric, corpus score, per-image scores in `gts` order) for one pycocoevalcap scorer."""
    if name == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        corpus, per_image = Bleu(4).compute_score(gts, res, verbose=0)
        return [(f"BLEU-{n + 1}", corpus[n], per_image[n]) for n in range(4)]
    if name == "meteor":
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        corpus, per_image = meteor.compute_score(gts, res)
        del meteor  # stops its JVM now rather than at interpreter exit
        return [("METEOR", corpus, per_image)]
    if name == "rouge":
        from pycocoevalcap.rouge.rouge import Rouge

        return [("ROUGE-L", *Rouge().compute_score(gts, res))]
    if name == "cider":
        from pycocoevalcap.cider.cider import Cider

        return [("CIDEr", *Cider().compute_score(gts, res))]
    return _run_spice(gts, res, skipped, strict)


def _run_spice(
    gts: dict[str, list[str]], res: dict[str, list[str]], skipped: dict[str, str], strict: bool
) -> list[tuple[str, float, Sequence[float]]]:
    """SPICE, or nothing with a one-line reason (`_cannot_run`): it needs a CoreNLP download and a
    Java 8/11 JVM."""
    from pycocoevalcap.spice import get_stanford_models
    from pycocoevalcap.spice.spice import Spice

    lib = Path(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB)
    corenlp = get_stanford_models.JAR  # "stanford-corenlp-3.6.0"
    if offline() and not (lib / f"{corenlp}.jar").exists():  # pycocoevalcap would download it now
        reason = (
            f"offline (HF_HUB_OFFLINE is set), and it needs Stanford CoreNLP 3.6.0, which is not installed; "
            f"run once online, or put {corenlp}.jar and {corenlp}-models.jar into {lib}"
        )
    else:
        try:
            with captured_output() as output:  # download progress, Java stack traces
                corpus, per_image = Spice().compute_score(gts, res)  # downloads CoreNLP (~400 MB) once
        except urllib.error.URLError as error:
            reason = (
                f"it needs Stanford CoreNLP 3.6.0, downloaded on first use, and the download failed "
                f"({getattr(error, 'reason', error)}); run once online, "
                f"or put {corenlp}.jar and {corenlp}-models.jar into {lib}"
            )
        except OSError as error:  # e.g. pycocoevalcap's folder is read-only: it writes temp files there
            reason = f"could not run it ({error})"
        except subprocess.CalledProcessError as error:
            reason = (
                f"its Java program failed with status {error.returncode} ({_java_error(output)}); "
                f"SPICE 1.0 needs Java 8 or 11 and {corenlp}.jar and {corenlp}-models.jar in {lib}"
            )
        else:
            # Spice returns its per-image scores in sorted id order, unlike every other scorer.
            by_id = dict(zip(sorted(gts), per_image))
            return [("SPICE", corpus, [by_id[i]["All"]["f"] for i in gts])]
    _cannot_run(skipped, "SPICE", reason, strict=strict)
    notice(f"SPICE skipped: {reason}; the other metrics are reported.")
    return []


def _cannot_run(skipped: dict[str, str], name: str, reason: str, *, strict: bool) -> None:
    """Record why metric `name` is skipped; a UserError instead when `strict` (the user named it)."""
    if strict:
        raise UserError(f"{name} cannot run: {reason}")
    skipped[name] = reason


def offline() -> bool:
    """Whether downloads are off: huggingface_hub's offline mode (read when it was imported) or
    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set now."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


def _java_error(lines: list[str]) -> str:
    """The line of a Java stack trace that names the error."""
    errors = [line for line in lines if "Exception" in line or "Error" in line]
    line = (errors or lines or ["no output"])[0]
    return line.removeprefix('Exception in thread "main" ').strip()[:200]
