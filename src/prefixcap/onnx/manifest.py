"""The manifest of an ONNX export (`prefixcap_onnx.json`), and its one reader: a manifest is checked,
never trusted.

`onnx.export` writes the manifest (and reads its export back through these checks before the
folder appears); `onnx.runtime` reads it before any graph runs. The checks:

- `files.*` name entries inside the export folder, after links are resolved;
- every number is a whole number, and those that size the cache and the bindings (layers, KV
  heads, head size, hidden size, vocabulary, prefix length) equal the graphs' own input and
  output shapes, as ONNX Runtime reports them;
- `max_positions` leaves room after the prefix and is at most the rows of the decoder graph's
  position table, where it has one (GPT-2's learned positions; rotary ones have none);
- the embeddings are the one tensor "weight" [vocab_size, hidden_size], floating point, finite.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from prefixcap.errors import ModelLoadError
from prefixcap.model.config import CaptionConfig
from prefixcap.model.hf_loading import check_finite, read_json
from prefixcap.system.extras import require
from prefixcap.system.hardware import EXPORT_QUANTIZE_CHOICES

MANIFEST_NAME = "prefixcap_onnx.json"
FORMAT = "prefixcap-onnx"
# 3: GroupQueryAttention, with past_length and past/present buffers that may be shared;
# 4: per-row `lengths` in place of past_length (rows of different lengths in one batch)
FORMAT_VERSION = 4
ENCODER_FILE, DECODER_FILE, EMBEDDINGS_FILE = "encoder.onnx", "decoder.onnx", "embeddings.safetensors"
# The manifest's `files`: what each entry is, and the name an export gives it
FILES = {"encoder": ENCODER_FILE, "decoder": DECODER_FILE, "embeddings": EMBEDDINGS_FILE,
         "tokenizer": "tokenizer", "image_processor": "image_processor"}  # fmt: skip
FOLDERS = ("tokenizer", "image_processor")  # the `files` entries that are folders
# Every entry an export may hold (graphs over 2 GiB keep their weights beside them, in NAME.data):
# anything else in an export folder is the user's, and is never deleted.
EXPORT_ENTRIES = (MANIFEST_NAME, *FILES.values(), f"{ENCODER_FILE}.data", f"{DECODER_FILE}.data")
EXPORT_DIRECTORY = "prefixcap ONNX export"
MAX_POSITIONS = 2**20  # a bound for decoders without a position table (rotary positions)


def past_names(layers: int) -> list[str]:
    """The decoder graph's cache inputs, in order: past.0.key, past.0.value, past.1.key, ..."""
    return [f"past.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """The decoder graph's cache outputs, in the order of `past_names`: present.0.key, present.0.value, ..."""
    return [name.replace("past.", "present.", 1) for name in past_names(layers)]


def is_onnx_export(path: str | Path) -> bool:
    """Whether `path` is a folder holding an ONNX export's manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()


@dataclass(frozen=True)
class Manifest:
    """A manifest whose paths and numbers `read_manifest` checked (`check_graphs` then checks the
    numbers against the graphs); `values` is the whole document, for what is only informative."""

    path: Path  # the manifest file, which errors name
    files: dict[str, Path]  # FILES' keys -> resolved paths inside the export folder
    caption_config: CaptionConfig
    prefix_length: int
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    quantize: str | None
    values: dict[str, Any]

    def refuse(self, reason: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {reason}")


def read_manifest(directory: str | Path) -> Manifest:
    """The export's manifest, checked for its format and version, its paths and the types and
    ranges of its numbers (not yet against the graphs: `check_graphs`); ModelLoadError says what
    is wrong, naming the manifest."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    values = read_json(path)
    if not isinstance(values, dict) or values.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: not a {EXPORT_DIRECTORY} manifest (format is not {FORMAT!r})")
    version = values.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: format_version {version!r} is newer than this prefixcap reads ({FORMAT_VERSION}); upgrade prefixcap"
        )
    if version < FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: format_version {version} was written by an older prefixcap; export the model again "
            "(prefixcap export onnx MODEL OUT --overwrite)"
        )
    config = values.get("caption_config")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: caption_config must be an object")
    try:
        caption_config = CaptionConfig(**config)
    except TypeError as error:  # an unknown field
        raise ModelLoadError(f"{path}: caption_config: {error}") from None
    except ModelLoadError as error:
        raise ModelLoadError(f"{path}: caption_config: {error}") from None
    numbers = {name: _whole_number(path, values, name) for name in (
        "prefix_length", "hidden_size", "vocab_size", "num_layers", "num_kv_heads", "head_dim", "max_positions",
    )}  # fmt: skip
    if numbers["prefix_length"] != caption_config.prefix_length:
        raise ModelLoadError(
            f"{path}: prefix_length {numbers['prefix_length']} differs from caption_config's {caption_config.prefix_length}"
        )
    if numbers["max_positions"] <= numbers["prefix_length"]:
        raise ModelLoadError(
            f"{path}: max_positions {numbers['max_positions']} leaves no room after the prefix "
            f"({numbers['prefix_length']} positions)"
        )
    if numbers["max_positions"] > MAX_POSITIONS:
        raise ModelLoadError(f"{path}: max_positions {numbers['max_positions']} is over {MAX_POSITIONS}")
    quantize = values.get("quantize")
    if quantize is not None and quantize not in EXPORT_QUANTIZE_CHOICES:
        raise ModelLoadError(f"{path}: quantize must be null or one of {', '.join(EXPORT_QUANTIZE_CHOICES)}")
    files = values.get("files")
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise ModelLoadError(f"{path}: files must name exactly {', '.join(FILES)}")
    resolved = {key: _inside(directory, path, key, files[key]) for key in FILES}
    return Manifest(path, resolved, caption_config, **numbers, quantize=quantize, values=values)


def check_graphs(manifest: Manifest, encoder: Any, decoder: Any, *, image_size: tuple[int, int] | None = None) -> None:
    """Refuse a manifest whose numbers differ from the graphs' own input and output shapes (ONNX
    Runtime sessions `encoder` and `decoder`), or whose max_positions exceeds the decoder graph's
    position table; `image_size` (height, width) is what the image processor gives the encoder."""
    inputs = {arg.name: arg.shape for arg in decoder.get_inputs()}
    outputs = {arg.name: arg.shape for arg in decoder.get_outputs()}
    layers = sum(name.startswith("past.") for name in inputs) // 2
    expected = (["inputs_embeds", "lengths", *past_names(layers)], ["logits", *present_names(layers)])
    if (list(inputs), list(outputs)) != expected:
        raise manifest.refuse(f"{manifest.files['decoder']} lacks the inputs and outputs of a prefixcap decoder graph")
    encoder_in, encoder_out = [arg.name for arg in encoder.get_inputs()], [arg.name for arg in encoder.get_outputs()]
    if (encoder_in, encoder_out) != (["pixel_values"], ["prefix_embeds"]):
        raise manifest.refuse(f"{manifest.files['encoder']} lacks the input and output of a prefixcap encoder graph")
    pixels, prefix = encoder.get_inputs()[0].shape, encoder.get_outputs()[0].shape
    caches = {(_dim(inputs[name], 1), _dim(inputs[name], 3)) for name in past_names(layers)}
    kv_heads, head_dim = caches.pop() if len(caches) == 1 else (None, None)  # every layer's alike, or none fits
    found = {  # the manifest's number -> (the graph's, whose)
        "num_layers": (layers, "decoder graph's {} layers"),
        "num_kv_heads": (kv_heads, "decoder graph's {}"),
        "head_dim": (head_dim, "decoder graph's {}"),
        "hidden_size": (_dim(inputs["inputs_embeds"], 2), "decoder graph's {}"),
        "vocab_size": (_dim(outputs["logits"], 2), "decoder graph's {}"),
        "prefix_length": (_dim(prefix, 1), "encoder graph's {}"),
    }
    for name, (size, whose) in found.items():
        if getattr(manifest, name) != size:
            raise manifest.refuse(f"{name} {getattr(manifest, name)} differs from the {whose.format(size)}")
    if _dim(prefix, 2) != manifest.hidden_size:
        raise manifest.refuse(
            f"the encoder graph's prefix width {_dim(prefix, 2)} differs from hidden_size {manifest.hidden_size}"
        )
    if manifest.caption_config.decoder_hidden_size != manifest.hidden_size:
        raise manifest.refuse(f"caption_config's decoder_hidden_size differs from hidden_size {manifest.hidden_size}")
    if image_size is not None and (len(pixels) != 4 or tuple(pixels[2:]) != tuple(image_size)):
        raise manifest.refuse(
            f"the encoder graph reads pixel_values {pixels}, but the image processor gives {image_size[0]}x{image_size[1]}"
        )
    table = position_table_rows(manifest.files["decoder"])
    if table is not None and manifest.max_positions > table:
        raise manifest.refuse(
            f"max_positions {manifest.max_positions} is more than the decoder graph's {table} positions"
        )


def read_embeddings(manifest: Manifest) -> torch.Tensor:
    """The token embeddings [vocab_size, hidden_size] as float32: the file's one tensor "weight",
    its shape checked before it is read, then its dtype and finiteness."""
    path = manifest.files["embeddings"]
    expected = (manifest.vocab_size, manifest.hidden_size)
    try:
        with safe_open(path, framework="pt") as file:
            names = sorted(file.keys())
            if names != ["weight"]:
                raise ModelLoadError(f"{path}: holds {', '.join(names) or 'nothing'}, not the one tensor 'weight'")
            shape = tuple(file.get_slice("weight").get_shape())
            if shape != expected:
                raise ModelLoadError(f"{path}: tensor 'weight' has shape {shape}, but the graphs need {expected}")
            weight = file.get_tensor("weight")
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{path}: damaged safetensors file ({error})") from None
    if not weight.is_floating_point():
        raise ModelLoadError(
            f"{path}: tensor 'weight' is {str(weight.dtype).removeprefix('torch.')}, not floating point"
        )
    check_finite({"weight": weight}, path)
    return weight.float()


def position_table_rows(decoder: Path) -> int | None:
    """The rows of the decoder graph's learned position table (the smallest 2-D initializer that a
    Gather reads: the graph gets token embeddings, not ids), or None for a graph without one."""
    require("onnx", "onnx", feature="running an ONNX export")
    import onnx

    try:
        graph = onnx.load(str(decoder), load_external_data=False).graph
    except Exception as error:  # protobuf's DecodeError and others; ONNX Runtime loaded it already
        raise ModelLoadError(f"{decoder}: cannot read the graph ({error})") from None
    tables = {tensor.name: tensor.dims[0] for tensor in graph.initializer if len(tensor.dims) == 2}
    rows = [tables[node.input[0]] for node in graph.node if node.op_type == "Gather" and node.input[0] in tables]
    return min(rows, default=None)


def _whole_number(path: Path, values: dict[str, Any], name: str) -> int:
    value = values.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"{path}: {name} must be a whole number >= 1, got {reprlib.repr(value)}")
    return value


def _inside(directory: Path, path: Path, key: str, name: Any) -> Path:
    """`files.KEY`'s entry, resolved (links too), if it lies inside the export folder and has the
    kind it should (a folder for the tokenizer and image processor, else a regular file)."""
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"{path}: files.{key} must be a name in the export folder, got {reprlib.repr(name)}")
    root = directory.resolve()
    entry = (directory / name).resolve()
    if entry == root or not entry.is_relative_to(root):
        raise ModelLoadError(f"{path}: files.{key}: {name!r} lies outside the export folder")
    if not (entry.is_dir() if key in FOLDERS else entry.is_file()):
        raise ModelLoadError(f"{path}: files.{key}: missing {name} (the ONNX export is incomplete)")
    return entry


def _dim(shape: Any, index: int) -> int | None:
    """The fixed size of `shape[index]`, or None where the graph leaves it free (or lacks it)."""
    size = shape[index] if len(shape) > index else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None
