"""`prefixcap convert-clipcap`: import an original ClipCap checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefixcap.cli.common import bounded
from prefixcap.errors import UserError
from prefixcap.model.config import CaptionConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-clipcap",
        help="convert a ClipCap (MLP mapper) checkpoint into a prefixcap model directory",
        description="Convert a ClipCap checkpoint (rmokady/CLIP_prefix_caption, MLP mapper) into a "
        "prefixcap model directory. The checkpoint is read with torch.load(weights_only=True); prefix "
        "length and sizes are inferred from its tensors. Captions stop at '.' (ClipCap trained no EOS).",
    )
    parser.add_argument("checkpoint", type=Path, help="ClipCap .pt file (e.g. coco_weights.pt)")
    parser.add_argument("out_dir", type=Path, help="model directory to write")
    parser.add_argument(
        "--vision-encoder",
        default=CaptionConfig.vision_encoder,
        help="CLIP hub id or directory the checkpoint's features came from (default: %(default)s)",
    )
    parser.add_argument(
        "--decoder",
        default=CaptionConfig.decoder,
        help="GPT-2 hub id or directory for config and tokenizer (default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens", type=bounded(int, 1), metavar="N",
        help="the model's default longest caption, in tokens (default: ClipCap's own, which a decoder with few "
        "positions may not have room for after the prefix)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it already holds a prefixcap model directory (a folder holding anything "
        "else is never replaced)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefixcap.model.clipcap import convert_clipcap

    length = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    try:
        model = convert_clipcap(
            args.checkpoint, args.out_dir, vision_encoder=args.vision_encoder, decoder=args.decoder,
            overwrite=args.overwrite, **length,
        )  # fmt: skip
    except UserError as error:
        if length or "max_new_tokens" not in str(error):
            raise
        raise UserError(f"{error}; choose a shorter default with --max-new-tokens N") from None
    print(f"wrote {args.out_dir} (mlp mapper, prefix length {model.config.prefix_length}, stop token '.')")
    return 0
