"""`prefixcap synth`: write a small synthetic dataset to try the pipeline end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefixcap.cli.common import bounded
from prefixcap.data.synth import (
    BACKGROUND_COLORS,
    MIN_IMAGE_SIZE,
    MIN_NUM_IMAGES,
    OBJECT_COLORS,
    TASKS,
    make_synthetic_dataset,
)
from prefixcap.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic captioned image set for checking a set-up",
        description="Draw images of one coloured shape on a coloured background, captioned "
        "'a red shape on a white background', and write OUT_DIR/images/*.png plus "
        "OUT_DIR/captions.jsonl with train/val/test splits (80/10/10). A working pipeline "
        "(prepare, train, caption) learns these captions even with tiny models on a CPU. "
        "--task two-balls checks prompts instead: two balls of different colours, and each record's "
        "prompt, 'left:' or 'right:', says which one the caption ('a red ball') describes. "
        "--task wordings shows what self-critical training does: the shapes images, each with 5 references "
        "worded in 4 ways, where greedy captions of a cross-entropy model take the short, hedged wording "
        "('a red shape') and `train --objective scst` learns the consensus that names the background too.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write into (created if missing)")
    parser.add_argument(
        "--num-images", type=bounded(int, MIN_NUM_IMAGES), default=600, metavar="N",
        help="number of images (default: 600)",
    )  # fmt: skip
    parser.add_argument(
        "--seed",
        type=bounded(int, 0, 2**32 - 1),
        default=0,
        metavar="S",
        help="random seed; the same seed gives the same files (default: 0)",
    )
    parser.add_argument(
        "--image-size", type=bounded(int, MIN_IMAGE_SIZE), default=64, metavar="PX",
        help="image width and height in pixels (default: 64)",
    )  # fmt: skip
    parser.add_argument(
        "--task", choices=TASKS, default="shapes",
        help="shapes: one shape, captioned by its and the background's colours; two-balls: prompt-conditioned "
        "captions of one of two balls; wordings: shapes with 5 differently worded references each, for SCST "
        "(default: shapes)",
    )  # fmt: skip
    parser.add_argument(
        "--pairs", type=colour_pairs, metavar="OBJ:BG,...",
        help="shapes and wordings: only these (object, background) colour pairs, from "
        f"{', '.join(sorted({**OBJECT_COLORS, **BACKGROUND_COLORS}))}, e.g. red:yellow,yellow:red: a domain of its "
        "own, such as one whose captions a model never saw, for `caption --datastore` (default: every object "
        "colour on every background colour)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def colour_pairs(text: str) -> list[tuple[str, str]]:
    """ "red:yellow,green:blue" as [("red", "yellow"), ("green", "blue")], every name a palette colour."""
    palette = {**OBJECT_COLORS, **BACKGROUND_COLORS}
    pairs = [tuple(item.strip().split(":")) for item in text.split(",")]
    if not all(len(pair) == 2 and all(name in palette for name in pair) for pair in pairs):
        raise argparse.ArgumentTypeError(f"want OBJ:BG pairs separated by commas, with colours from {sorted(palette)}")
    return pairs


def run(args: argparse.Namespace) -> int:
    if args.pairs and args.task == "two-balls":
        raise UserError("--pairs: the two-balls task has its own colours; use it with --task shapes or wordings")
    captions = make_synthetic_dataset(
        args.out_dir, num_images=args.num_images, seed=args.seed, image_size=args.image_size, task=args.task,
        pairs=args.pairs,
    )  # fmt: skip
    print(f"wrote {args.num_images} images and {captions}")
    return 0
