"""Export a model directory to ONNX: an encoder graph, a one-step KV-cache decoder graph, the token
embeddings, the tokenizer, the image processor and a manifest (layout: `onnx.runtime`).

The decoder graph is the Hugging Face decoder's own forward, run without a transformers cache and
with `onnx.attention`'s attention implementation, which makes each layer's attention one
GroupQueryAttention node over that layer's `past.*` buffers (appended to in place when the caller
shares them with the `present.*` outputs, as `onnx.runtime.OrtDecoder` does). Rows of one batch may
differ in length (a prompt per image): the graph takes each row's length and runs each row at its
own positions. Any causal LM whose base model takes `inputs_embeds` and `position_ids`, whose
attention modules call transformers' attention interface and whose LM head is its output
embeddings exports the same way (GPT-2 and the Llama family are tested; the numerical check below
decides for others). Graphs come from `torch.onnx.export`'s maintained exporter (torch.export +
onnxscript); int8 weights from ONNX Runtime's `quantize_dynamic`, int4 weights from its
`MatMulNBitsQuantizer` (com.microsoft MatMulNBits, which onnxruntime-web runs too).

Every export is checked on the spot, before the folder appears: both graphs run in ONNX Runtime on
sample inputs and must match PyTorch (fp32: `FP32_TOLERANCE`; int8 and int4: `QUANTIZED_TOLERANCE`). An export
that fails its check is never written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from prefixcap.errors import UserError
from prefixcap.model.caption_model import CaptionModel
from prefixcap.onnx.attention import TRANSLATION, SharedKV, attention_of
from prefixcap.onnx.manifest import (
    DECODER_FILE,
    EMBEDDINGS_FILE,
    ENCODER_FILE,
    EXPORT_DIRECTORY,
    EXPORT_ENTRIES,
    FILES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    check_graphs,
    is_onnx_export,
    past_names,
    present_names,
    read_embeddings,
    read_manifest,
)
from prefixcap.onnx.runtime import OrtDecoder, session
from prefixcap.system.atomic import atomic_dir, check_output_dir
from prefixcap.system.extras import require
from prefixcap.system.hardware import EXPORT_QUANTIZE_CHOICES

DEFAULT_OPSET = 18  # the dynamo exporter's native opset; ONNX Runtime >= 1.14 and onnxruntime-web run it
MIN_OPSET = 18  # the exporter's own ops are written for 18 and up
# fp32 graphs must match PyTorch within atol + rtol * max|reference| (max over all outputs compared)
FP32_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
# Quantized weights: prefix embeddings and logits within this fraction of the fp32 reference's range
# (max |diff| / (max - min)); the captions' agreement is what matters, which tests/test_cpu_speed.py (int8),
# tests/test_onnx.py and tests/test_web_browser.py (int4) guard. int4: full-size CLIP B/32 + MLP + GPT-2
# with random weights measures 0.10 (encoder) and 0.12 (decoder), the tiny test models under 0.05;
# 0.25 leaves room for trained weights' outliers, while a wrong scale or block layout measures near 1.
QUANTIZED_TOLERANCE = {"int8": 0.05, "int4": 0.25}
QUANTIZE_PER_CHANNEL = True  # int8 weights with one scale per output channel (see quantize_graph)
INT4_BLOCK_SIZE = 32  # int4 weights: one float32 scale per 32 weights along the input dimension
QUANTIZATION = {  # what each --quantize does, for the manifest
    "int8": {
        "method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": QUANTIZE_PER_CHANNEL,
        "ops": ["MatMul", "Gemm"], "graphs": ["encoder", "decoder"],
    },
    "int4": {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "op": "com.microsoft.MatMulNBits",
        "bits": 4, "block_size": INT4_BLOCK_SIZE, "symmetric": True, "ops": ["MatMul", "Gemm"], "graphs": ["encoder", "decoder"],
        "embeddings": "int4 in the same blocks, stored dequantized as float32 (the values the graphs' int4 LM head holds "
        "for a tied decoder)",
    },
}  # fmt: skip
TOLERANCE_TEXT = {  # the checks, in words, for the manifest (its "checked" entry gives the measured values)
    "fp32": f"max |onnxruntime - pytorch| <= {FP32_TOLERANCE['atol']} + {FP32_TOLERANCE['rtol']} * max |pytorch|, "
    "for the prefix embeddings, for the logits and keys/values of a prefill and cached steps, and for the logits "
    "of rows of different lengths against each row alone",
    **{
        kind: f"max |onnxruntime {kind} - pytorch fp32| <= {limit} * (max - min of pytorch fp32), for the prefix "
        "embeddings and the logits (rows of different lengths included)"
        for kind, limit in QUANTIZED_TOLERANCE.items()
    },
}
CHECK_ROWS, CHECK_STEPS = 3, 3  # sample rows and cached steps after the prefill, for the check


class ExportCheckError(UserError):
    """A graph's outputs differ from PyTorch's beyond the tolerance: the export is not written."""


class CheckResult(NamedTuple):
    """The largest differences the check measured (all within the tolerance): fp32 graphs, max
    |error|; int8 graphs, max |error| / the reference's range."""

    encoder: float
    decoder: float


# ---------------------------------------------------------------------- the graphs' modules
class EncoderGraph(nn.Module):
    """pixel_values -> prefix embeddings: the model's image encoder, then its mapper."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.prefix_embeds(self.model.encode_images(pixel_values))


class DecoderStep(nn.Module):
    """The reference for the decoder graph: one step of the HF forward with its own `DynamicCache`
    built from `past` (per layer its keys, then its values, each [rows, kv_heads, P, head_dim]);
    returns the last position's logits [rows, V], then per layer the keys and the values of all
    P+S positions. Positions follow from the cache's length: P .. P+S-1."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.decoder.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        logits = self.decoder(inputs_embeds=inputs_embeds, cache=cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1], *(kind for layer in cache.layers for kind in (layer.keys, layer.values))


class DecoderGraph(nn.Module):
    """The module exported as decoder.onnx: the same step as `DecoderStep`, run inside
    `onnx.attention.attention_of(decoder)` (GroupQueryAttention over the `past` buffers, see the
    manifest's usage), for rows that may differ in length: `lengths` [rows] is each row's positions
    after the step, right-padded. A prefill (every row at most S long) runs row r's positions
    0 .. lengths[r] - 1; any other step continues each row after its own past, lengths - S
    positions. Returns each row's logits at its last new position, [rows, 1, V], then the presents."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(
        self, inputs_embeds: torch.Tensor, lengths: torch.Tensor, past: list[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        length = inputs_embeds.shape[1]
        past_lengths = (lengths - length).clamp(min=0)
        positions = past_lengths.unsqueeze(1) + torch.arange(length)
        shared_kv = SharedKV(past, lengths)
        hidden = self.decoder.base_model(
            inputs_embeds=inputs_embeds, position_ids=positions, use_cache=False, shared_kv=shared_kv
        ).last_hidden_state
        # each row's last new position, then the LM head on [rows, 1, hidden] only
        last = (lengths - past_lengths - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return self.decoder.get_output_embeddings()(hidden.gather(1, last)), *shared_kv.present


class CacheShape(NamedTuple):
    layers: int
    kv_heads: int
    head_dim: int


def cache_shape(decoder: nn.Module) -> CacheShape:
    """The decoder's KV cache sizes, read from one tiny forward rather than from config names,
    which differ between model families (n_head, num_key_value_heads, head_dim, ...)."""
    from transformers import DynamicCache

    name = type(decoder).__name__
    hidden = decoder.get_input_embeddings().embedding_dim
    cache = DynamicCache(config=decoder.config)
    try:
        with torch.no_grad():
            decoder(inputs_embeds=torch.zeros(1, 1, hidden), cache=cache, use_cache=True, logits_to_keep=1)
    except Exception as error:  # a forward without a `cache` argument, or a wrapped (PEFT) decoder
        raise UserError(f"cannot export the decoder {name}: its forward does not take a KV cache ({error})") from None
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {"DynamicLayer"}:  # sliding-window layers drop old positions: `past` would not match
        raise UserError(f"cannot export the decoder {name}: its KV cache has {', '.join(sorted(kinds))} layers")
    keys = cache.layers[0].keys
    return CacheShape(len(cache.layers), keys.shape[1], keys.shape[3])


# ---------------------------------------------------------------------- export
def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export the model directory `model_dir` to `out_dir` (see the module docstring) and return
    the manifest written there. `quantize="int8"` gives both graphs int8 weights (dynamic
    quantization of their MatMuls), `quantize="int4"` 4-bit blockwise ones (`quantize_graph`). The folder appears only once both graphs passed their check
    (`ExportCheckError` otherwise); an earlier export there is replaced only with `overwrite`,
    and a folder holding anything else (an export included) is refused. `progress` is told each step's name."""
    require("onnx", feature="prefixcap export onnx")
    if quantize is not None and quantize not in EXPORT_QUANTIZE_CHOICES:
        raise UserError(f"quantize={quantize!r}: choose one of {', '.join(EXPORT_QUANTIZE_CHOICES)}")
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset}: the exporter writes opset {MIN_OPSET} or newer")
    check_output_dir(
        out_dir, what=EXPORT_DIRECTORY, is_ours=is_onnx_export, overwrite=overwrite, entries=EXPORT_ENTRIES
    )
    say = progress or (lambda step: None)
    say("loading the model")
    model = CaptionModel.from_pretrained(model_dir, device="cpu", dtype=torch.float32).eval()
    shape = cache_shape(model.decoder)
    with atomic_dir(out_dir, ours=EXPORT_ENTRIES) as staging:
        say("exporting the encoder")
        export_encoder(model, staging / ENCODER_FILE, opset=opset)
        say("exporting the decoder")
        export_decoder(model.decoder, staging / DECODER_FILE, shape, opset=opset)
        embeddings = model.decoder.get_input_embeddings().weight.detach().float().contiguous()
        save_file({"weight": embeddings}, staging / EMBEDDINGS_FILE)
        model.tokenizer.save_pretrained(staging / "tokenizer")
        model.image_processor.save_pretrained(staging / "image_processor")
        say("checking the graphs against PyTorch in ONNX Runtime")
        checked = {"fp32": check_export(model, staging)}
        if quantize is not None:
            say(f"quantizing the graphs to {quantize}")
            for graph in (ENCODER_FILE, DECODER_FILE):
                quantize_graph(staging / graph, quantize)
            if quantize == "int4":  # the embeddings the int4 LM head holds, so that both stores agree
                save_file({"weight": dequantize_int4(*int4_blocks(embeddings), embeddings.shape[1])},
                          staging / EMBEDDINGS_FILE)  # fmt: skip
            say(f"checking the {quantize} graphs")
            checked[quantize] = check_export(model, staging, quantized=quantize)
        manifest = build_manifest(model, shape, quantize=quantize, opset=opset, checked=checked, source=model_dir)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        say("reading the export back as prefixcap reads it")
        written = read_manifest(staging)  # what runtime checks, so no export is written that it would refuse
        check_graphs(written, session(written.files["encoder"]), session(written.files["decoder"]))
        read_embeddings(written)
    return manifest


@contextmanager
def _quiet_exporter():
    """The exporter's step-by-step notes and transformers' deprecation notices are not the user's
    concern; errors still raise."""
    import logging

    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "")  # "": quantize_dynamic's advice
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _export(module: nn.Module, args: tuple, path: Path, *, opset: int, **names: Any) -> None:
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > 2**30  # protobuf's limit is 2 GiB
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, verbose=False, **names)
        except Exception as error:  # torch.export's and onnxscript's many error types
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(f"cannot export {path.stem} to ONNX: {reason}") from None
        program.save(str(path), external_data=large)


def export_encoder(model: CaptionModel, path: Path, *, opset: int = DEFAULT_OPSET) -> None:
    """encoder.onnx: pixel_values [batch, 3, H, W] float32 -> prefix_embeds [batch, K, hidden]."""
    from PIL import Image
    from torch.export import Dim

    pixels = model.preprocessor.pixels(Image.new("RGB", (640, 480)))
    sample = model.preprocessor.normalize(pixels.unsqueeze(0).expand(2, -1, -1, -1).contiguous())
    _export(
        EncoderGraph(model).eval(), (sample,), path, opset=opset,
        input_names=["pixel_values"], output_names=["prefix_embeds"],
        dynamic_shapes={"pixel_values": {0: Dim("batch")}},
    )  # fmt: skip


def export_decoder(decoder: nn.Module, path: Path, shape: CacheShape, *, opset: int = DEFAULT_OPSET) -> None:
    """decoder.onnx: (inputs_embeds [rows, S, hidden], lengths [rows] int64, past.{layer}.key/value
    [rows, kv_heads, L, head_dim]) -> (logits [rows, 1, V] of each row's last position,
    present.{layer}.key/value); see `DecoderGraph` and the manifest's usage."""
    from torch.export import Dim

    hidden = decoder.get_input_embeddings().embedding_dim
    rows, length, past_length = 2, 3, 4  # distinct sample sizes, none 0 or 1 (those would be specialised)
    sample = (
        torch.randn(rows, length, hidden),
        torch.tensor([past_length + length, past_length + length - 1]),
        [torch.randn(rows, shape.kv_heads, past_length, shape.head_dim) for _ in range(2 * shape.layers)],
    )
    rows_dim, past_dim = Dim("rows"), Dim("past_length")
    with attention_of(decoder):
        _export(
            DecoderGraph(decoder).eval(), sample, path, opset=opset, custom_translation_table=TRANSLATION,
            input_names=["inputs_embeds", "lengths", *past_names(shape.layers)],
            output_names=["logits", *present_names(shape.layers)],
            dynamic_shapes={
                "inputs_embeds": {0: rows_dim, 1: Dim("length")}, "lengths": {0: rows_dim},
                "past": [{0: rows_dim, 2: past_dim}] * (2 * shape.layers),
            },
        )  # fmt: skip


def quantize_graph(path: Path, kind: str = "int8") -> None:
    """Give a graph quantized weights in place, for every MatMul and Gemm with a constant weight.
    int8: ONNX Runtime's dynamic quantization (int8 per output channel; activations quantized per
    call). int4: MatMulNBits, 4-bit symmetric blocks of INT4_BLOCK_SIZE weights along the input
    dimension with a float32 scale each, float32 activations (Gemms become MatMul + Add first: the
    quantizer takes MatMuls only). Layer norms, attention scores, the encoder's patch embedding (a
    Conv), position tables and the embeddings stay float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantized = path.with_suffix(f".{kind}.onnx")
    with _quiet_exporter():
        if kind == "int8":
            quantize_dynamic(
                path, quantized, weight_type=QuantType.QInt8, per_channel=QUANTIZE_PER_CHANNEL,
                op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True},
            )  # fmt: skip
        else:
            graph = onnx.load(str(path))
            _gemms_as_matmuls(graph.graph)
            quantizer = MatMulNBitsQuantizer(graph, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True)
            quantizer.process()
            quantizer.model.save_model_to_file(str(quantized), use_external_data_format=False)
    quantized.replace(path)
    for leftover in path.parent.glob(f"{path.name}.data"):  # fp32 weights stored beside a large graph
        leftover.unlink()


def _gemms_as_matmuls(graph: Any) -> None:
    """Rewrite each Gemm with a constant weight (alpha = beta = 1, A not transposed) as MatMul then
    Add of its bias, in place; the weight is stored transposed where the Gemm transposed it."""
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes = []
    for node in graph.node:
        options = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        plain = options.get("alpha", 1.0) == options.get("beta", 1.0) == 1.0 and not options.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in initializers:
            nodes.append(node)
            continue
        weight = node.input[1]
        if options.get("transB", 0):
            array = numpy_helper.to_array(initializers[weight]).T.copy()
            weight = f"{weight}.transposed"
            graph.initializer.append(numpy_helper.from_array(array, weight))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}.matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}.matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}.bias"))
    used = {name for node in nodes for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept)


def int4_blocks(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """`weight` [rows, width] in MatMulNBits' int4 layout, each row quantized as the quantizer does a
    weight's column: (packed uint8 [rows, blocks, INT4_BLOCK_SIZE / 2], two values a byte, low nibble
    first, each value + 8; scales float32 [rows, blocks]). A width that is not a whole number of
    blocks is padded with zeros."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True)
    columns = np.ascontiguousarray(weight.detach().float().numpy().T)  # the C++ kernel reads it row-major
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(columns)
    return packed, scales


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, width: int) -> torch.Tensor:
    """The float32 values [rows, width] of `int4_blocks`' output: (nibble - 8) * the block's scale."""
    rows, blocks, _ = packed.shape
    nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(rows, blocks, INT4_BLOCK_SIZE)
    values = (nibbles.astype(np.float32) - 8) * scales[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(values.reshape(rows, -1)[:, :width]))


# ---------------------------------------------------------------------- the check
@torch.no_grad()
def check_export(model: CaptionModel, directory: Path, *, quantized: str | None = None) -> CheckResult:
    """Run both graphs of `directory` in ONNX Runtime on sample inputs and compare with PyTorch:
    the encoder's prefix embeddings, then the decoder's logits (and, fp32, its keys and values) for
    a prefill of the prefix and CHECK_STEPS cached steps, each step fed the same input embeddings,
    and for rows of different lengths in one batch; the graph keeps its own cache, shared with its
    outputs as `OrtDecoder` runs it. `quantized` graphs ("int8", "int4") are held to
    QUANTIZED_TOLERANCE, others to FP32_TOLERANCE. Raises ExportCheckError naming the graph and the
    difference when over the tolerance."""
    encoder, decoder = session(directory / ENCODER_FILE), session(directory / DECODER_FILE)
    generator = torch.Generator().manual_seed(0)
    size = model.preprocessor.pixels(_blank_image()).shape
    pixels = torch.randint(0, 256, (CHECK_ROWS, *size), dtype=torch.uint8, generator=generator)
    pixel_values = model.preprocessor.normalize(pixels)
    prefix = EncoderGraph(model)(pixel_values)
    (got,) = encoder.run(None, {"pixel_values": pixel_values.numpy()})
    compare = functools.partial(_check_quantized, quantized) if quantized else _check_close
    encoder_error = compare(directory / ENCODER_FILE, "prefix embeddings", torch.from_numpy(got), prefix)

    step, embedding = DecoderStep(model.decoder), model.decoder.get_input_embeddings()
    shape = cache_shape(model.decoder)
    # the decoder graph runs as prefixcap runs it: on an engine-layout cache shared with its outputs
    graph = OrtDecoder(
        decoder, embedding.weight.detach(), num_layers=shape.layers, num_kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_positions=model.decoder.config.max_position_embeddings,
    )  # fmt: skip
    cache = graph.new_cache(CHECK_ROWS, prefix.shape[1] + CHECK_STEPS)
    past = cache[:, :, :, :, :0]
    embeds, decoder_error = prefix, 0.0
    for index in range(1 + CHECK_STEPS):
        logits, *present = step(embeds, list(past.flatten(0, 1)))
        present = torch.stack(present).unflatten(0, (shape.layers, 2))
        got_logits = graph(embeds, past.shape[4], cache)
        where = "the prefill" if index == 0 else f"cached step {index}"
        errors = [compare(directory / DECODER_FILE, f"logits at {where}", got_logits, logits)]
        if not quantized:  # quantized keys and values differ as much as the logits do: those are checked
            got_present = cache[:, :, :, :, : present.shape[4]]
            errors.append(_check_close(directory / DECODER_FILE, f"keys and values at {where}", got_present, present))
        decoder_error = max(decoder_error, *errors)
        past = present
        embeds = embedding(logits.argmax(dim=-1)).unsqueeze(1)
    ragged_error = _check_ragged(step, graph, prefix, functools.partial(compare, directory / DECODER_FILE))
    return CheckResult(encoder_error, max(decoder_error, ragged_error))


def _check_ragged(step: DecoderStep, graph: OrtDecoder, prefix: torch.Tensor, compare: Callable) -> float:
    """The decoder graph on rows of different lengths (the prefix's rows cut to K, K-1, ...; a
    prefill and a cached step) against the reference on each row alone, with `compare(what, got,
    expected)`: the largest difference."""
    width, empty = prefix.shape[1], [torch.zeros(1, graph.num_kv_heads, 0, graph.head_dim)] * len(graph.past_names)
    lengths = (width - torch.arange(prefix.shape[0])).clamp(min=1)
    cache = graph.new_cache(prefix.shape[0], width + 1)
    got_prefill = graph(prefix, 0, cache, lengths)
    tokens = got_prefill.argmax(dim=-1)
    got_step = graph(graph.embed(tokens), width, cache, lengths + 1)
    errors = []
    for row, length in enumerate(lengths.tolist()):
        logits, *present = step(prefix[row : row + 1, :length], empty)
        where = f"a row of {length} positions in a batch of different lengths"
        errors.append(compare(f"logits of {where}", got_prefill[row : row + 1], logits))
        logits, *_ = step(graph.embed(tokens[row : row + 1]), present)
        errors.append(compare(f"logits of {where}, cached step", got_step[row : row + 1], logits))
    return max(errors)


def _check_close(path: Path, what: str, got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected|, checked against FP32_TOLERANCE (scaled by the reference's magnitude)."""
    if got.shape != expected.shape:
        raise ExportCheckError(f"{path}: {what} have shape {tuple(got.shape)}, PyTorch's {tuple(expected.shape)}")
    error = float((got - expected).abs().max()) if got.numel() else 0.0
    limit = FP32_TOLERANCE["atol"] + FP32_TOLERANCE["rtol"] * float(expected.abs().max() if expected.numel() else 0)
    if not error <= limit:  # NaN fails too
        raise ExportCheckError(
            f"{path}: ONNX Runtime's {what} differ from PyTorch's by {error:.3g} (tolerance {limit:.3g}); "
            "the export is not written"
        )
    return error


def _check_quantized(kind: str, path: Path, what: str, got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / (max - min of expected), checked against QUANTIZED_TOLERANCE[kind]."""
    if got.shape != expected.shape:
        raise ExportCheckError(f"{path}: {what} have shape {tuple(got.shape)}, PyTorch's {tuple(expected.shape)}")
    spread = float(expected.max() - expected.min()) or 1.0
    error = float((got - expected).abs().max()) / spread
    limit = QUANTIZED_TOLERANCE[kind]
    if not error <= limit:
        raise ExportCheckError(
            f"{path}: ONNX Runtime's {kind} {what} differ from PyTorch's fp32 by {error:.3g} of their range "
            f"(tolerance {limit}); the export is not written"
        )
    return error


def _blank_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (640, 480))


# ---------------------------------------------------------------------- the manifest
def build_manifest(
    model: CaptionModel,
    shape: CacheShape,
    *,
    quantize: str | None,
    opset: int,
    checked: dict[str, CheckResult],
    source: Any,
) -> dict[str, Any]:
    """What another runtime needs to drive the graphs (`onnx.runtime` reads the same)."""
    import onnx
    import onnxruntime
    import transformers

    decoder_config = model.decoder.config
    hidden = model.decoder.get_input_embeddings().embedding_dim
    height, width = model.preprocessor.pixels(_blank_image()).shape[1:]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "files": FILES,
        "usage": {
            "encoder": f"pixel_values [batch, 3, {height}, {width}] float32, the image processor's normalised "
            f"output -> prefix_embeds [batch, {model.config.prefix_length}, {hidden}]",
            "decoder": f"inputs_embeds [rows, length, {hidden}] float32, lengths [rows] int64 (each row's positions "
            f"after this step: past + new) and, for each layer i < {shape.layers}, past.i.key and past.i.value [rows, "
            f"kv_heads={shape.kv_heads}, L, head_dim={shape.head_dim}] -> logits [rows, 1, vocab] of each row's last "
            "new position and, for each layer, present.i.key and present.i.value. Attention is com.microsoft "
            "GroupQueryAttention. Rows of different lengths are right-padded: a row's positions start at 0. The "
            "prefill (empty past, L = 0 unshared) runs row r's first lengths[r] of the length inputs (the rest is "
            "padding; the longest row fills them all); a later step gives every row one new position (length 1), "
            "after its own past of lengths[r] - 1 positions. Shared buffers (fastest): bind each past.i.* and "
            "present.i.* to the same buffer of any length L >= max(lengths); the step reads each row's past "
            "positions and writes its new ones after them, in place. Unshared: L = the longest past, and "
            "present.i.* [rows, kv_heads, L + length, head_dim] holds each row's past followed by its new "
            "positions, the next step's past. Positions (lengths - length, clamped at 0) onwards are added by "
            "the graph",
            "embeddings": f"{EMBEDDINGS_FILE} tensor 'weight' [vocab, {hidden}]: token embeddings (no positions) "
            "for the decoder's inputs_embeds",
            "decoding": "prefill [prefix_embeds; embeddings of prompt_ids], then feed each chosen token's embedding "
            "with the cache, until a stop token or max_new_tokens",
        },  # fmt: skip
        "prefix_length": model.config.prefix_length,
        "prompt": model.config.prompt,
        "prompt_ids": model.prompt_ids(),
        "stop_token_ids": model.stop_token_ids(),
        "pad_token_id": model.tokenizer.pad_token_id,
        "generation": dataclasses.asdict(model.generation_options()),
        "hidden_size": hidden,
        "vocab_size": model.decoder.get_input_embeddings().num_embeddings,
        "num_layers": shape.layers,
        "num_kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "max_positions": decoder_config.max_position_embeddings,
        "decoder_type": decoder_config.model_type,
        "dtype": "float32",
        "quantize": quantize,
        "quantization": None if quantize is None else QUANTIZATION[quantize],
        "opset": opset,
        "tolerance": {name: TOLERANCE_TEXT[name] for name in checked},
        "checked": {name: result._asdict() for name, result in checked.items()},
        "caption_config": dataclasses.asdict(model.config),
        "source": str(source),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },  # fmt: skip
    }
