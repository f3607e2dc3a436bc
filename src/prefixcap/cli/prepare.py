"""`prefixcap prepare`: encode a caption dataset's images once into a feature store."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from prefixcap.cli.common import add_column_arguments, add_outside_root_argument, bounded
from prefixcap.cli.ray import PREPARE_EPILOG, add_ray_arguments
from prefixcap.data import FORMATS
from prefixcap.model.config import DEFAULT_VISION_ENCODER, FEATURE_KINDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="encode a dataset's images once into a feature store for training and evaluation",
        description=textwrap.fill(
            "Read a caption dataset (COCO captions JSON, Karpathy dataset_coco.json, JSONL, CSV, "
            "a folder of images with .txt captions, WebDataset .tar shards, a Hugging Face imagefolder "
            "(metadata.jsonl/.csv) or Parquet dataset, or a hub dataset hf://datasets/OWNER/NAME[@REV]), encode every image once "
            "with the image encoder (CLIP, SigLIP or DINOv2), and write fp16 embeddings (pooled, or patch tokens "
            "for a resampler mapper) in shards plus an index of image ids, "
            "paths, splits and captions to FEATURES. Unreadable images are skipped and listed with their "
            "reasons in FEATURES/bad_images.jsonl. A rerun keeps finished shards, so an interrupted run "
            "resumes. Runs data-parallel under `accelerate launch -m prefixcap prepare ...`, or on a Ray "
            "cluster with --ray.",
            width=100,
        ),  # (wrapped here: the epilog's lines are kept as they are)
        epilog=PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "data", metavar="DATA", help="dataset file, folder, WebDataset shard pattern or hf://datasets/OWNER/NAME[@REV]"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FEATURES", help="feature store folder to write")
    parser.add_argument(
        "--images-root",
        type=Path,
        metavar="DIR",
        help="folder that relative image paths start from (default: the dataset file's folder)",
    )
    parser.add_argument("--format", choices=FORMATS, help="dataset format (default: detected from DATA)")
    add_outside_root_argument(parser)
    add_column_arguments(parser)
    parser.add_argument(
        "--vision-encoder", default=DEFAULT_VISION_ENCODER, metavar="ID_OR_DIR",
        help="image encoder (hub id or folder of a CLIP, SigLIP or DINOv2 model) whose features are stored "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--features", choices=FEATURE_KINDS, default="pooled",
        help="pooled: one embedding per image, for the linear, mlp and transformer mappers; patches: the "
        "encoder's patch tokens, for --mapper resampler (N times the size: printed before encoding starts) "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=bounded(int, 1), default=256, metavar="N", help="images per encoder batch (default: 256)"
    )
    parser.add_argument(
        "--shard-size", type=bounded(int, 1), default=2048, metavar="N",
        help="images per shard; an interrupted run redoes at most one shard per process (default: 2048)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=bounded(int, 0), metavar="N",
        help="image decoding processes per encoder process (default: this machine's CPUs shared by its "
        "processes, at most 8; with --ray, Ray's tasks decode instead)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the feature store at FEATURES when none of its shards comes from these inputs "
        "(a rerun with the same inputs continues it without this; a folder that is not a feature store "
        "is always refused)",
    )  # fmt: skip
    add_ray_arguments(parser, work=("encoding", "encodes"), writes="Writes the same feature store into --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefixcap.pipeline.features import BAD_IMAGES, MANIFEST
    from prefixcap.pipeline.prepare import prepare_features

    options = {
        "images_root": args.images_root, "format": args.format, "image_column": args.image_column,
        "caption_column": args.caption_column, "vision_encoder": args.vision_encoder, "batch_size": args.batch_size,
        "shard_size": args.shard_size, "overwrite": args.overwrite, "features": args.features,
        "allow_outside_root": args.allow_outside_root,
    }  # fmt: skip
    if args.ray is not None:
        from prefixcap.cli.ray import cluster_settings
        from prefixcap.jobs.ray_prepare import prepare_on_ray
        from prefixcap.jobs.ray_units import RayCluster

        with RayCluster(**cluster_settings(args)) as cluster:  # (no ray installed: one line, before any work)
            manifest = prepare_on_ray(cluster, args.data, args.out, **options)
    else:
        manifest = prepare_features(args.data, args.out, num_workers=args.workers, **options)
    if manifest is None:  # not the main process: it wrote its shards, the main process reports
        return 0
    splits = ", ".join(f"{count} {split}" for split, count in manifest.splits.items())
    kind = f" as {manifest.num_patches} patch tokens each" if manifest.features == "patches" else ""
    print(f"encoded {manifest.num_images} images ({splits}){kind} into {args.out / MANIFEST}")
    if manifest.num_bad:
        print(f"skipped {manifest.num_bad} unreadable images; reasons in {args.out / BAD_IMAGES}", file=sys.stderr)
    return 0
