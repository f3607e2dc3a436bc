"""`prefixcap demo`: a working model without the hub: a tiny CLIP-style encoder and GPT-2-style
decoder that learn, a synthetic captioned image set, and the commands that take them through
prepare, train, caption, evaluate and serve in a few minutes on a CPU."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from prefixcap.errors import UserError

NUM_IMAGES = 600  # `prefixcap synth`'s default: 480 train, 60 val, 60 test
# What makes the tiny models learn the synthetic captions (>= 90% of held-out captions exact): a
# short prefix, a high learning rate and enough epochs. The defaults suit real models instead.
TRAIN_SETTINGS = ("--prefix-length", "4", "--epochs", "30", "--batch-size", "16", "--lr", "3e-3", "--val-images", "60",
                  "--seed", "0")  # fmt: skip
EVALUATE_METRICS = "bleu,rouge,cider,stats"  # all run offline; stats holds exact_match_pct
# A model this small trains several times faster on one thread than on PyTorch's default of one per
# core, whose threads wait on each other at every one of its tiny operations, more so on a busy machine.
ONE_THREAD = "OMP_NUM_THREADS=1"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build a tiny encoder, decoder and synthetic dataset to try every command offline",
        description="Write a tiny CLIP-style image encoder (DIR/models/clip) and GPT-2-style decoder "
        f"(DIR/models/gpt2) with random weights, and {NUM_IMAGES} synthetic images of a coloured shape on a "
        "coloured background with their captions (DIR/data, as `prefixcap synth` writes them), then print the "
        "commands that prepare, train, caption, evaluate and serve a model with them: no download, a few "
        "minutes on a CPU, and the model learns (evaluate prints exact_match_pct, the held-out captions "
        "equal to their reference).",
    )
    parser.add_argument("out_dir", type=Path, metavar="DIR", help="folder to create (new or empty)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefixcap.data.synth import make_synthetic_dataset
    from prefixcap.system.atomic import atomic_dir
    from prefixcap.testing import build_learnable_components

    out = args.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new one for the demo")
    with atomic_dir(out) as staging:  # all of it or nothing, should it be interrupted
        build_learnable_components(staging / "models")
        make_synthetic_dataset(staging / "data", num_images=NUM_IMAGES)
    print(
        f"wrote a tiny image encoder ({out / 'models' / 'clip'}), a tiny decoder ({out / 'models' / 'gpt2'}) and "
        f"{NUM_IMAGES} synthetic images with captions ({out / 'data' / 'captions.jsonl'}: 80% train, 10% val, "
        "10% test). Next, from this folder:"
    )
    for command, comment in demo_commands(out):
        thread = f"{ONE_THREAD} " if command[1] == "train" else ""
        print(f"  {thread}{shlex.join(command)}  # {comment}")
    return 0


def demo_commands(root: Path) -> list[tuple[list[str], str]]:
    """(command, what it does) for each step after `prefixcap demo ROOT`, as a user types them."""
    models, data, features, best = root / "models", root / "data", root / "features", root / "run" / "best"
    test_images = data / "images" / f"{(NUM_IMAGES - 10) // 10:03d}*.png"  # the last 10, in the test split
    return [
        (["prefixcap", "prepare", str(data / "captions.jsonl"), "--out", str(features), "--vision-encoder",
          str(models / "clip")], "encode the images once"),
        (["prefixcap", "train", str(features), "--decoder", str(models / "gpt2"), "--out", str(root / "run"),
          *TRAIN_SETTINGS], "the longest step; one thread is fastest for a model this small"),
        (["prefixcap", "caption", str(test_images), "--model", str(best)], "held-out images"),
        (["prefixcap", "evaluate", "--model", str(best), "--data", str(features), "--metrics", EVALUATE_METRICS,
          "--out", str(root / "evaluation")], "the test split: exact_match_pct"),
        (["prefixcap", "serve", "--model", str(best)], "then open http://127.0.0.1:8000/ (API: /docs)"),
    ]  # fmt: skip
