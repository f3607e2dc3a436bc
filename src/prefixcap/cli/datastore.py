"""`prefixcap datastore build|add`: caption datastores for retrieval-augmented captioning."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefixcap.cli.common import DATASETS_HELP, add_column_arguments, bounded
from prefixcap.data import FORMATS, SPLITS
from prefixcap.model.config import DEFAULT_VISION_ENCODER
from prefixcap.retrieval.index import INDEX_KINDS

EPILOG = """\
the datastore folder:
  datastore.json   the CLIP (name, and probe embeddings that identify it), index settings, recall@k of an
                   approximate index against exact search, counts, sources, each file's size and sha256
  index.faiss      the FAISS index of the captions' normalised CLIP text embeddings
  captions.json    each image's id and captions, in index order

examples:
  prefixcap datastore build dataset_coco.json --split train --out ds/coco
  prefixcap datastore build captioned_photos/ --out ds/house --encoder openai/clip-vit-large-patch14
  prefixcap datastore build laion.parquet --out ds/big --index ivf --nprobe 64
  prefixcap datastore add ds/house more_photos/
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "datastore",
        help="build a caption datastore for retrieval-augmented captioning, or add captions to one",
        description="A caption datastore holds captions embedded with a CLIP's text tower, so that the captions "
        "of images similar to a new one can be found by its CLIP image embedding.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="embed a caption dataset's captions into a new datastore",
        description="Read the captions of a dataset (images are not opened), embed them with a full CLIP's text "
        "tower (normalised projected embeddings, the space of the CLIP's projected image embeddings), "
        "index them with FAISS and write the datastore folder DS atomically. A caption model can use the "
        "store only if its image encoder is this CLIP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("captions", metavar="CAPTIONS", help=DATASETS_HELP)
    build.add_argument("--out", type=Path, required=True, metavar="DS", help="datastore folder to write")
    build.add_argument(
        "--encoder", default=DEFAULT_VISION_ENCODER, metavar="CLIP_DIR",
        help="a full CLIP (text and image towers; hub id or folder): the image encoder of the caption models "
        "that will use the store (default: %(default)s)",
    )  # fmt: skip
    build.add_argument(
        "--index", choices=INDEX_KINDS, default="flat",
        help="flat: exact inner product; ivf: k-means lists, the --nprobe nearest searched; hnsw: a graph. The "
        "approximate ones are for millions of captions; their recall@10 against exact search, measured on the "
        "store's own captions, is printed and kept in the manifest (default: %(default)s)",
    )  # fmt: skip
    build.add_argument("--nlist", type=bounded(int, 1), help="ivf: lists (default: 4 sqrt(captions), 40+ per list)")
    build.add_argument("--nprobe", type=bounded(int, 1), help="ivf: lists searched per query (default: 32)")
    build.add_argument("--hnsw-m", type=bounded(int, 2), help="hnsw: links per node (default: 32)")
    build.add_argument("--ef-search", type=bounded(int, 1), help="hnsw: candidates kept per search (default: 128)")
    build.add_argument(
        "--overwrite", action="store_true",
        help="replace the datastore at DS (a folder that is not a datastore is always refused)",
    )  # fmt: skip
    _add_reading_arguments(build)
    build.set_defaults(func=run_build)

    add = actions.add_parser(
        "add",
        help="append a dataset's captions to a datastore",
        description="Embed the captions of another dataset with the datastore's CLIP and append them; the "
        "datastore is rewritten whole, atomically. Images already in it are refused.",
    )
    add.add_argument("datastore", metavar="DS", type=Path, help="datastore folder")
    add.add_argument("captions", metavar="CAPTIONS", help=DATASETS_HELP)
    add.add_argument(
        "--encoder", metavar="CLIP_DIR",
        help="where the datastore's CLIP is now, if it has moved; it must be the same CLIP (default: the one "
        "the datastore names)",
    )  # fmt: skip
    _add_reading_arguments(add)
    add.set_defaults(func=run_add)


def _add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split", action="append", choices=SPLITS, metavar="SPLIT",
        help="take only this split's captions (train, val or test; repeat for several) (default: all). Keep the "
        "captions of images you evaluate on out of the store: they would be retrieved as their own answers",
    )  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, help="dataset format (default: detected from CAPTIONS)")
    parser.add_argument(
        "--images-root", type=Path, metavar="DIR",
        help="folder that relative image paths start from; it shapes the image ids, which must match a feature "
        "store's for training to exclude an image's own captions (default: the dataset file's folder)",
    )  # fmt: skip
    add_column_arguments(parser)
    parser.add_argument(
        "--device", default=None, help="torch device for the text tower, e.g. cpu, cuda (default: cuda if available)"
    )
    parser.add_argument(
        "--batch-size", type=bounded(int, 1), default=256, metavar="N", help="captions per text batch (default: 256)"
    )


def _reading(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "splits": args.split, "format": args.format, "images_root": args.images_root,
        "image_column": args.image_column, "caption_column": args.caption_column, "device": args.device,
        "batch_size": args.batch_size,
    }  # fmt: skip


def run_build(args: argparse.Namespace) -> int:
    from prefixcap.retrieval import IndexSettings, build_datastore

    settings = IndexSettings(args.index, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                             ef_search=args.ef_search)  # fmt: skip
    store = build_datastore(
        args.captions, args.out, encoder=args.encoder, index=settings, overwrite=args.overwrite, **_reading(args)
    )
    _report(store, "wrote")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from prefixcap.retrieval import add_to_datastore

    store = add_to_datastore(args.datastore, args.captions, encoder=args.encoder, **_reading(args))
    _report(store, "added to")
    return 0


def _report(store: Any, verb: str) -> None:
    """What the store holds now, its index and recall, and a note if evaluation splits are in it."""
    origin = store.sources[-1]
    splits = ", ".join(f"{count} {split}" for split, count in origin["splits"].items())
    print(
        f"{verb} {store.path}: {origin['captions']} captions of {origin['images']} images ({splits}) from "
        f"{origin['source']}; the store holds {len(store)} captions of {store.num_images} images, embedded with "
        f"{store.encoder.name}"
    )
    print(f"index: {store.settings.describe()}")
    if store.recall is not None:
        recall = store.recall
        print(f"recall@{recall['k']} against exact search: {recall['recall']:.3f} "
              f"({recall['queries']} of the store's captions as queries)")  # fmt: skip
    held_out = [split for split in ("val", "test") if split in origin["splits"]]
    if held_out:
        print(
            f"note: the store holds {' and '.join(held_out)} captions; evaluating on those images with it retrieves "
            "their own references (build from --split train for evaluation)",
            file=sys.stderr,
        )
