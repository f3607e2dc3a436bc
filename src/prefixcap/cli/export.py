"""`prefixcap export onnx`: write a model as ONNX graphs that ONNX Runtime runs (`prefixcap caption
--model OUT_DIR` then captions with them, on CPU). `prefixcap export web`: a static folder that
captions images in the browser with those graphs on onnxruntime-web."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefixcap.cli.common import bounded
from prefixcap.model.registry import REGISTRY
from prefixcap.system.hardware import EXPORT_QUANTIZE_CHOICES

EPILOG = """\
the export folder:
  encoder.onnx            pixel_values [batch, 3, H, W] -> prefix embeddings [batch, K, hidden]
  decoder.onnx            one decoder step: (inputs_embeds, lengths, past keys/values) -> (last logits,
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


WEB_EPILOG = """\
the export folder (serve it from any static host, e.g. `python -m http.server -d OUT_DIR`):
  index.html, page.js     the page: drop or pick images; captions appear as they are made
  captioner.js            the ES module: const c = await Captioner.load(url);
                          await c.caption(image, {numBeams, maxNewTokens})
  model/                  encoder.onnx, decoder.onnx, embeddings, tokenizer data (text.json)
  ort/                    onnxruntime-web, the pinned npm release, checked against its integrity
  prefixcap_web.json      the manifest: shapes, preprocessing constants, prompt, stop ids, defaults

WASM by default, with threads when the page is cross-origin isolated (COOP/COEP headers: `prefixcap
serve --web OUT_DIR` and hosts that read _headers send them); WebGPU for float32 exports where the
browser has it. int8 and int4 exports run on WASM.

examples:
  prefixcap export web my-model/ exports/my-model-web --quantize int4      # the smallest
  prefixcap export web exports/my-model-int8 exports/my-model-web      # reuse an `export onnx` folder
  prefixcap serve --model my-model/ --web exports/my-model-web         # the page offers both
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model for other runtimes (ONNX, the browser)",
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
        "--quantize", choices=EXPORT_QUANTIZE_CHOICES,
        help="int8: int8 weights in both graphs (ONNX Runtime dynamic quantization of their MatMuls): a quarter of the size, "
        "faster on CPUs with VNNI or AMX; int4: 4-bit weights in blocks of 32 (MatMulNBits), about a sixth of the "
        "size; both checked against fp32 with a looser tolerance (default: float32)",
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

    web = formats.add_parser(
        "web",
        help="a static web page that captions images in the browser",
        description="Write a folder that captions images in the browser with onnxruntime-web: nothing is uploaded. "
        "Preprocessing, greedy and beam search and text decoding run in JavaScript and give the tokens of "
        "prefixcap's Python path.",
        epilog=WEB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    web.add_argument(
        "model", metavar="MODEL",
        help=f"registered name ({', '.join(REGISTRY)}), model directory, hub id, or a folder written by `export onnx`",
    )  # fmt: skip
    web.add_argument(
        "out_dir", metavar="OUT_DIR", type=Path, help="folder to write (new, empty, or an earlier web export)"
    )
    web.add_argument(
        "--quantize", choices=EXPORT_QUANTIZE_CHOICES,
        help="int8: int8 weights (as `export onnx --quantize int8`) and int8 token embeddings; int4: 4-bit weights "
        "and embeddings, the smallest export (a tied decoder's embeddings are read from its LM head); both run on "
        "WASM (default: float32, which can also run on WebGPU)",
    )  # fmt: skip
    web.add_argument(
        "--ort-web", metavar="FILE.tgz", type=Path,
        help="onnxruntime-web's npm tarball (`npm pack onnxruntime-web@VERSION`), for exports without network; "
        "checked against the pinned release's integrity (default: fetched with npm pack)",
    )  # fmt: skip
    web.add_argument(
        "--overwrite", action="store_true",
        help="replace OUT_DIR if it already holds a prefixcap web export (a folder holding anything else is never replaced)",
    )  # fmt: skip
    web.set_defaults(func=run_web)


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
        f"{kind} max {'relative ' if kind != 'fp32' else ''}error: encoder {errors['encoder']:.2g}, decoder "
        f"{errors['decoder']:.2g}"
        for kind, errors in manifest["checked"].items()
    )
    kind = f"{args.quantize} weights" if args.quantize else "float32"
    print(f"wrote {args.out_dir} ({kind}, opset {args.opset}; checked against PyTorch: {checked})")
    return 0


def run_web(args: argparse.Namespace) -> int:
    from prefixcap.model.registry import resolve_model_dir
    from prefixcap.onnx.runtime import is_onnx_export
    from prefixcap.web.export import export_web

    start = time.perf_counter()

    def progress(step: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {step}", file=sys.stderr, flush=True)

    model = args.model if is_onnx_export(args.model) else resolve_model_dir(args.model)
    manifest = export_web(
        model, args.out_dir, quantize=args.quantize, ort_web_tarball=args.ort_web, overwrite=args.overwrite,
        progress=progress,
    )  # fmt: skip
    size = sum(path.stat().st_size for path in args.out_dir.rglob("*") if path.is_file())
    print(
        f"wrote {args.out_dir} ({manifest['precision']}, {size / 1e6:.1f} MB, onnxruntime-web {manifest['ort']['version']}); "
        f"serve it, e.g. python -m http.server -d {args.out_dir}"
    )
    return 0
