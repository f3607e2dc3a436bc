"""`prefixcap export web`: a static folder that captions images in the browser, with nothing uploaded.

    index.html, page.js        the page: drop or pick images, captions appear as they are made
    captioner.js               the ES module (`Captioner.load(url)`, `caption(image, options)`), with
    preprocess.js, search.js,  its image preprocessing, greedy and beam search, and text decoding
    text.js
    model/encoder.onnx,        the ONNX export's graphs, unchanged (`onnx.export`: the decoder's
    model/decoder.onnx         GroupQueryAttention runs in onnxruntime-web's WASM and WebGPU builds)
    model/embeddings.safetensors  token embeddings: float32, int8 with a scale per token (int8 exports), or
                               int4 blocks (int4 exports); none where the decoder's quantized LM head
                               holds the same values (a tied decoder): the page reads them from decoder.onnx
    model/text.json            id -> token string, special ids, the tokenizer's decoder pipeline
    ort/                       onnxruntime-web, the pinned release (`web.ort_web`)
    prefixcap_web.json         the manifest: shapes, preprocessing constants, prompt and stop ids,
                               generation defaults, file sizes, the ONNX export's own manifest
    _headers                   COOP/COEP headers for hosts that read this file (WASM threads)

The page's JavaScript reproduces prefixcap's Python path: Pillow's resampling and the processor's
normalisation table (bit-equal uint8 pixels), the engine's searches, Hugging Face tokenizers'
decoding. What it cannot reproduce is refused here, in one line naming it: another resize rule, a
tokenizer decoder it does not run, sampling as the model's default.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from prefixcap.errors import UserError
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.config import CaptionConfig
from prefixcap.model.encoders import load_image_processor
from prefixcap.model.hf_loading import read_safetensors
from prefixcap.onnx.export import INT4_BLOCK_SIZE, dequantize_int4, export_onnx, int4_blocks
from prefixcap.onnx.manifest import is_onnx_export, read_manifest
from prefixcap.system.atomic import atomic_dir, check_output_dir
from prefixcap.system.files import read_regular
from prefixcap.web import ort_web

FORMAT, FORMAT_VERSION = "prefixcap-web", 1
WEB_MANIFEST = "prefixcap_web.json"
MAX_MANIFEST_BYTES = 1 << 22  # shapes, preprocessing tables and ids: far less, even for a large vocabulary
WEB_DIRECTORY = "prefixcap web export"
STATIC_DIR = Path(__file__).with_name("static")
PAGE_FILES = ("index.html", "page.js", "captioner.js", "preprocess.js", "search.js", "text.js")
MODEL_DIR, ORT_DIR, HEADERS_FILE = "model", "ort", "_headers"
WEB_ENTRIES = (WEB_MANIFEST, *PAGE_FILES, MODEL_DIR, ORT_DIR, HEADERS_FILE)  # all an export writes at its top
# Pillow filters that preprocess.js reproduces (all of its convolution filters; NEAREST is another code path)
RESAMPLE_NAMES = {1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
# tokenizers decoders that text.js runs (its SUPPORTED_DECODERS; a test checks that both agree)
SUPPORTED_DECODERS = ("ByteLevel", "ByteFallback", "Fuse", "Strip", "Replace", "Metaspace", "Sequence")
ONNX_PROVENANCE = ("format_version", "opset", "dtype", "quantize", "quantization", "tolerance", "checked", "versions")
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


def is_web_export(path: str | Path) -> bool:
    """Whether `path` is a folder holding a web export's manifest (and so may be replaced by one)."""
    return (Path(path) / WEB_MANIFEST).is_file()


def read_web_manifest(directory: str | Path) -> dict[str, Any]:
    """A web export's manifest, checked for its format and version (UserError otherwise)."""
    path = Path(directory) / WEB_MANIFEST
    if not path.is_file():
        raise UserError(f"{directory}: not a {WEB_DIRECTORY} (no {WEB_MANIFEST}; `prefixcap export web` writes one)")
    try:
        manifest = json.loads(read_regular(path, MAX_MANIFEST_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise UserError(f"{path}: cannot read the web export's manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a {WEB_DIRECTORY} manifest (format is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {manifest.get('format_version')!r}, this prefixcap reads {FORMAT_VERSION}"
        )
    return manifest


def export_web(
    model: str | Path,
    out_dir: str | Path,
    *,
    quantize: str | None = None,
    ort_web_tarball: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the web export of `model` (a model directory, or a folder written by `export onnx`,
    whose graphs are reused) to `out_dir` and return its manifest. `quantize="int8"` or `"int4"`
    exports quantized graphs (a model directory only: an ONNX export's precision was fixed when it
    was written).
    `ort_web_tarball`: onnxruntime-web's npm tarball (None: `npm pack` it). The folder appears
    only when complete; an earlier web export there is replaced only with `overwrite`."""
    say = progress or (lambda step: None)
    model = Path(model)
    from_onnx = is_onnx_export(model)
    if from_onnx:
        onnx_manifest = read_manifest(model).values  # checked; the document as written
        if quantize not in (None, onnx_manifest.get("quantize")):
            raise UserError(
                f"{model}: this ONNX export is {onnx_manifest.get('quantize') or 'float32'}; export the model "
                f"directory with --quantize {quantize}, or `prefixcap export onnx MODEL DIR --quantize {quantize}` first"
            )
        generation = onnx_manifest["generation"]
    else:
        generation = CaptionConfig.load(model).generation
    check_output_dir(out_dir, what=WEB_DIRECTORY, is_ours=is_web_export, overwrite=overwrite, entries=WEB_ENTRIES)
    # everything the browser cannot do is refused before the slow steps
    text = text_data(model / "tokenizer")
    image = image_constants(
        ImagePreprocessor(load_image_processor(model / "image_processor")), model / "image_processor"
    )
    if generation.get("do_sample"):
        raise UserError(f"{model}: the model's default is sampling, which the browser captioner does not offer")
    with atomic_dir(out_dir, ours=WEB_ENTRIES) as staging:
        if from_onnx:
            source = model
        else:
            source = staging / ".onnx"
            export_onnx(model, source, quantize=quantize, progress=say)
            onnx_manifest = read_manifest(source).values
        say("writing the web export")
        precision = onnx_manifest.get("quantize") or "float32"
        files = onnx_manifest["files"]
        (staging / MODEL_DIR).mkdir()
        move = shutil.copyfile if from_onnx else shutil.move  # our own scratch export is moved
        for name in ("encoder", "decoder"):
            move(source / files[name], staging / MODEL_DIR / f"{name}.onnx")
        embeddings = read_safetensors(source / files["embeddings"])["weight"].float()
        in_decoder = write_embeddings(embeddings, precision, staging / MODEL_DIR, source / files["embeddings"])
        (staging / MODEL_DIR / "text.json").write_text(json.dumps(text, ensure_ascii=False), encoding="utf-8")
        if not from_onnx:
            shutil.rmtree(source)
        # int8's MatMulInteger has no WebGPU kernel; int4's MatMulNBits has one, but the WebGPU build
        # (29 MB) would double the runtime's share of an export whose point is its size
        bundles = ["wasm", "webgpu"] if precision == "float32" else ["wasm"]
        say(f"adding onnxruntime-web {ort_web.VERSION}")
        ort_web.install(staging / ORT_DIR, bundles, Path(ort_web_tarball) if ort_web_tarball else None)
        for name in PAGE_FILES:
            shutil.copyfile(STATIC_DIR / name, staging / name)
        headers = "".join(f"  {name}: {value}\n" for name, value in ISOLATION_HEADERS.items())
        (staging / HEADERS_FILE).write_text(f"/*\n{headers}")
        manifest = build_manifest(
            staging, onnx_manifest, text, image, bundles, precision=precision, in_decoder=in_decoder, source=model
        )
        (staging / WEB_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def write_embeddings(weight: torch.Tensor, precision: str, directory: Path, source: Path) -> dict[str, Any] | None:
    """Write the token embeddings for the page as `precision` stores them (float32; int8 with a
    scale per token; int4 blocks) in directory/embeddings.safetensors. int4 exports' embeddings
    (`source`) are already int4 values, stored as float32: the blocks found again here give the
    same floats, exactly. Where decoder.onnx (in `directory`) holds the very same int8 or int4
    values (a tied decoder's quantized LM head), no file is written: returns where they lie in the
    decoder's bytes (int8: the LM head's [hidden, vocab] layout, one column a token)."""
    if precision == "int8":
        rows = quantize_rows(weight)
        columns = {"weight": rows["weight"].T.contiguous().numpy(), "scale": rows["scale"].numpy()}
        ranges = _in_decoder(directory, columns)
        if ranges is None:
            save_file(rows, directory / "embeddings.safetensors")
        return ranges
    if precision != "int4":
        save_file({"weight": weight.contiguous()}, directory / "embeddings.safetensors")
        return None
    packed, scales = int4_blocks(weight)
    if not torch.equal(dequantize_int4(packed, scales, weight.shape[1]), weight):
        raise UserError(f"{source}: these embeddings are not int4 values; export the model again with --quantize int4")
    ranges = _in_decoder(directory, {"weight": packed, "scale": scales})
    if ranges is not None:
        return {"block_size": INT4_BLOCK_SIZE, **ranges}
    save_file(
        {"weight": torch.from_numpy(packed), "scale": torch.from_numpy(scales)}, directory / "embeddings.safetensors"
    )
    return None


def _in_decoder(directory: Path, arrays: dict[str, np.ndarray]) -> dict[str, list[int]] | None:
    """{name: [offset, length]} of each array's bytes in directory/decoder.onnx, if each occurs
    there exactly once; else None."""
    decoder = (directory / "decoder.onnx").read_bytes()
    ranges = {name: _only_occurrence(decoder, array.tobytes()) for name, array in arrays.items()}
    return None if None in ranges.values() else ranges


def _only_occurrence(data: bytes, part: bytes) -> list[int] | None:
    """[offset, length] of `part` in `data` if it occurs there exactly once, else None."""
    offset = data.find(part)
    if offset < 0 or data.find(part, offset + 1) >= 0:
        return None
    return [offset, len(part)]


def quantize_rows(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric int8 token embeddings with one float32 scale per token (row): a quarter of the
    float32 table, as the int8 decoder's own LM head stores the same matrix."""
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return {"weight": quantized.contiguous(), "scale": scale.float().contiguous()}


def text_data(tokenizer_dir: Path) -> dict[str, Any]:
    """What text.js needs to decode ids as `CaptionModel.decode` does: each id's token string (None
    where the tokenizer has none), the special ids (skipped), the tokenizer's decoder pipeline and
    whether transformers cleans up spaces afterwards. UserError names what the browser lacks."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as error:
        raise UserError(f"{tokenizer_dir}: cannot load the tokenizer ({error})") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{tokenizer_dir}: the browser needs a fast tokenizer (tokenizer.json); this one has none")
    decoder = json.loads(backend.to_str()).get("decoder")
    _check_decoder(decoder, tokenizer_dir)
    tokens = [backend.id_to_token(index) for index in range(backend.get_vocab_size(with_added_tokens=True))]
    special = {added.content for added in backend.get_added_tokens_decoder().values() if added.special}
    bpe_cleanup_skipped = type(backend.model).__name__ == "BPE" and not getattr(
        tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
    )  # transformers does not clean up a BPE tokenizer's text (TokenizersBackend._decode)
    return {
        "tokens": tokens,
        "special_ids": [index for index, token in enumerate(tokens) if token in special],
        "decoder": decoder,
        "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces) and not bpe_cleanup_skipped,
    }


def _check_decoder(decoder: dict[str, Any] | None, where: Path) -> None:
    if decoder is None:
        return
    kind = decoder.get("type")
    if kind not in SUPPORTED_DECODERS:
        raise UserError(
            f"{where}: the browser cannot decode this tokenizer's text: its decoder {kind} is not supported "
            f"(supported: {', '.join(SUPPORTED_DECODERS)})"
        )
    if kind == "Replace" and "String" not in decoder.get("pattern", {}):
        raise UserError(f"{where}: the browser cannot decode this tokenizer's text: its Replace decoder uses a regex")
    for step in decoder.get("decoders") or []:
        _check_decoder(step, where)


def image_constants(preprocessor: ImagePreprocessor, where: Path) -> dict[str, Any]:
    """The resize rule and the normalisation table of `preprocessor` for preprocess.js, or
    UserError naming what it does not reproduce (`where`: the image processor's folder)."""
    geometry = preprocessor.geometry
    if geometry is None:
        name = type(preprocessor.processor).__name__
        raise UserError(f"{where}: the browser cannot preprocess for {name}: its resize rule is not supported")
    if geometry.resample not in RESAMPLE_NAMES:
        raise UserError(
            f"{where}: the browser cannot resize with resample={geometry.resample} "
            f"(supported: {', '.join(f'{code} {name}' for code, name in RESAMPLE_NAMES.items())})"
        )
    return {
        "resize": {
            "shortest_edge": geometry.shortest_edge, "height": geometry.crop_height, "width": geometry.crop_width,
            "resample": geometry.resample, "vertical_first": pillow_shrinks_height_first(),
        },
        "levels": preprocessor.lookup.tolist(),  # float32 values, exact in JSON
    }  # fmt: skip


def pillow_shrinks_height_first() -> bool:
    """Whether this Pillow resizes an image whose width does not shrink but whose height does with
    its vertical pass first (Pillow 13 does; earlier ones always start with the horizontal pass,
    which rounds differently). Found by resizing a probe whole and in single-axis steps, each one pass."""
    probe = Image.frombytes("RGB", (3, 7), bytes((i * 97 + 13) % 256 for i in range(63)))
    whole = probe.resize((5, 4), Image.Resampling.BILINEAR)
    return (
        whole.tobytes()
        == probe.resize((3, 4), Image.Resampling.BILINEAR).resize((5, 4), Image.Resampling.BILINEAR).tobytes()
    )


def build_manifest(
    staging: Path,
    onnx_manifest: dict[str, Any],
    text: dict[str, Any],
    image: dict[str, Any],
    bundles: list[str],
    *,
    precision: str,
    in_decoder: dict[str, Any] | None,
    source: Path,
) -> dict[str, Any]:
    """What captioner.js reads (see the module docstring); sizes let the page show progress and
    refuse a truncated download. `in_decoder`: where the int8 or int4 embeddings lie in
    decoder.onnx, if they have no file of their own."""
    files = {
        "encoder": f"{MODEL_DIR}/encoder.onnx",
        "decoder": f"{MODEL_DIR}/decoder.onnx",
        "embeddings": f"{MODEL_DIR}/embeddings.safetensors",
        "text": f"{MODEL_DIR}/text.json",
    }
    if in_decoder is not None:
        del files["embeddings"]
    shapes = ("prefix_length", "hidden_size", "vocab_size", "num_layers", "num_kv_heads", "head_dim", "max_positions")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": source.resolve().name,
        "precision": precision,
        "embeddings": precision,
        # int4: the blocks' size, and the byte ranges [offset, length] of the blocks ("weight") and
        # their scales ("scale") in decoder.onnx, where it holds them; else they are the embeddings file's
        "int4_embeddings": None if precision != "int4" else in_decoder or {"block_size": INT4_BLOCK_SIZE},
        # int8: the byte ranges of the int8 values [hidden, vocab] ("weight") and the scale of each
        # token ("scale") in decoder.onnx, where its LM head holds them; else null (the embeddings file)
        "int8_embeddings": in_decoder if precision == "int8" else None,
        "files": files,
        "sizes": {name: (staging / path).stat().st_size for name, path in files.items()},
        "model": {name: onnx_manifest[name] for name in ("decoder_type", *shapes)},
        "image": image,
        "text": {
            "prompt": onnx_manifest["prompt"],
            "prompt_ids": onnx_manifest["prompt_ids"],
            "stop_token_ids": onnx_manifest["stop_token_ids"],
            "pad_token_id": onnx_manifest["pad_token_id"],
        },
        "generation": {key: value for key, value in onnx_manifest["generation"].items() if value is not None},
        "ort": {
            "package": ort_web.PACKAGE,
            "version": ort_web.VERSION,
            "integrity": ort_web.INTEGRITY,
            "directory": f"{ORT_DIR}/",
            "bundles": {bundle: f"{ORT_DIR}/{ort_web.BUNDLES[bundle][0]}" for bundle in bundles},
        },
        # how the graphs were made and checked; not the ONNX export's paths, which name folders on this machine
        "onnx": {key: onnx_manifest.get(key) for key in ONNX_PROVENANCE},
    }
