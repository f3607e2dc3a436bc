"""`prefixcap export onnx`: write a model as ONNX graphs that ONNX Runtime runs (`prefixcap caption
--model OUT_DIR` then captions with them, on CPU)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefixcap.cli.common import bounded
from prefixcap.model.registry import REGISTRY
from prefixcap.system.hardware import QUANTIZE_CHOICES

EPILOG = """\
the export folder:
  encoder.onnx            pixel_values [batch, 3, H, W] -> prefix embeddings [batch, K, hidden]
  decoder.onnx            one decoder step: (inputs_embeds, past_length, past keys/values) -> (last logits,
                          keys/values); attention is ONNX Runtime's GroupQueryAttention, which appends
                          to the past in place when past and present share a buffer (see the manifest)
  embeddings.safetensors  token embeddings, to feed chosen tokens back
  tokenizer/, image_processor/, prefixcap_onnx.json (the manifest: shapes, stop tokens, defaults)

Both graphs are run in ONNX Runtime on sample inputs and compared with PyTorch before the folder
is written; an export outside the tolerance (stated in the manifest) is not written.

examples:
  prefixcap export onnx clipcap-coco exports/coco-onnx
  prefixcap export onnx my-model/ exports/my-model-int8 --quantize int8
  prefixcap caption photos/ --model exports/my-model-int8
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model for other runtimes (ONNX)",
        description="Export a model for another runtime.",
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser(
        "onnx",
        help="ONNX graphs for ONNX Runtime",
        description="Export a model as two ONNX graphs (image encoder + mapper; one KV-cache decoder step) with "
        "its tokenizer, image processor and a manifest. `prefixcap caption/serve --model OUT_DIR` and "
        "Captioner.from_pretrained(OUT_DIR) run the export with ONNX Runtime on CPU, with the same "
        "greedy, beam and sampling decoding as the PyTorch engine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    onnx.add_argument(
        "model", metavar="MODEL", help=f"registered name ({', '.join(REGISTRY)}), model directory or hub id"
    )
    onnx.add_argument(
        "out_dir", metavar="OUT_DIR", type=Path, help="folder to write (new, empty, or an earlier export)"
    )
    onnx.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES,
        help="int8: int8 weights in both graphs (ONNX Runtime dynamic quantization of their MatMuls): a quarter of the size, "
        "faster on CPUs with VNNI or AMX; checked against fp32 with a looser tolerance (default: float32)",
    )  # fmt: skip
    onnx.add_argument(
        "--opset", type=bounded(int, 18), default=18,
        help="ONNX opset version to write, at least 18 (default: 18, run by ONNX Runtime >= 1.14 and onnxruntime-web)",
    )  # fmt: skip
    onnx.add_argument(
        "--overwrite", action="store_true",
        help="replace OUT_DIR if it already holds a prefixcap ONNX export (a folder holding anything else is never "
        "replaced)",
    )  # fmt: skip
    onnx.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefixcap.model.registry import resolve_model_dir
    from prefixcap.onnx.export import export_onnx

    start = time.perf_counter()

    def progress(step: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {step}", file=sys.stderr, flush=True)

    manifest = export_onnx(
        resolve_model_dir(args.model), args.out_dir, quantize=args.quantize, opset=args.opset,
        overwrite=args.overwrite, progress=progress,
    )  # fmt: skip
    checked = "; ".join(
        f"{kind} max {'relative ' if kind == 'int8' else ''}error: encoder {errors['encoder']:.2g}, decoder "
        f"{errors['decoder']:.2g}"
        for kind, errors in manifest["checked"].items()
    )
    kind = f"{args.quantize} weights" if args.quantize else "float32"
    print(f"wrote {args.out_dir} ({kind}, opset {args.opset}; checked against PyTorch: {checked})")
    return 0
