"""Captioning with an ONNX export (`prefixcap export onnx`) on ONNX Runtime's CPU execution provider.

An export directory holds two graphs and what is needed to drive them (see `onnx.export`, which
writes it, and its manifest, which describes it for other runtimes and which `onnx.manifest`
checks before any graph runs):

    encoder.onnx            pixel_values [B, 3, H, W] -> prefix_embeds [B, K, hidden]
    decoder.onnx            (inputs_embeds [rows, S, hidden], lengths [rows] int64,
                            past.{layer}.key/value [rows, kv_heads, L, head_dim])
                            -> (logits of each row's last position [rows, 1, V], present.{layer}.key/value)
    embeddings.safetensors  the token embedding matrix ("weight", [V, hidden]), no positions
    tokenizer/, image_processor/, prefixcap_onnx.json (the manifest)

The decoder's attention is ONNX Runtime's GroupQueryAttention (`onnx.attention`). `lengths` is each
row's positions after the step, so rows of different lengths (a prompt per image) decode in one
batch, right-padded as the engine keeps them (`engine.ragged`). Bound to the same buffer as its
`present`, each `past` is a cache of any length L >= max(lengths) that the step appends to in
place; unshared, `past` holds the longest row's past and `present` returns it followed by the new
positions.

No second search lives here: `OrtDecoder` is the decoding engine's forward object (the contract of
`engine.runner.DecodeRunner`: new_cache, embed, __call__, logits, refresh), so greedy, beam search
and sampling are the engine's own, token for token. `OnnxCaptionModel` offers the surface of
`CaptionModel` that the Captioner, the CLI and the server use, so they need no special cases.

Speed: `OrtDecoder` binds the engine's own cache as each layer's shared past/present buffer, so a
step copies no keys or values at all: the graph writes the new positions where the engine reads
them (benchmarks/results/cpu-2026-11-29/notes.md has the measurements behind these choices).

onnxruntime is an optional dependency (`pip install "prefixcap[onnx]"`): it is imported only after
`prefixcap.system.extras.require`, inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prefixcap.errors import ModelLoadError, UserError
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.encoders import load_image_processor
from prefixcap.model.generation import CaptionGeneration
from prefixcap.model.hf_loading import hf_call
from prefixcap.onnx.manifest import (
    Manifest,
    check_graphs,
    is_onnx_export,
    past_names,
    present_names,
    read_embeddings,
    read_manifest,
)
from prefixcap.system.extras import require

__all__ = ["OnnxCaptionModel", "OrtDecoder", "is_onnx_export", "session"]


def session(path: str | Path, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with every graph optimisation, running on `threads` threads
    (default: PyTorch's, `torch.get_num_threads()`, so that one setting governs both)."""
    require("onnx", "onnxruntime", feature="running an ONNX export")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1  # the graphs are sequential: parallelism is within operators
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the optimiser's notes are not the user's concern
    # Idle ORT threads sleep rather than spin: between steps PyTorch runs the search on the same cores,
    # and spinning threads starve it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load this graph ({reason})") from None


class OrtDecoder:
    """The decoder graph as the decoding engine's forward object (`engine.runner.DecodeRunner`).

    The KV cache is a CPU torch tensor [layers, 2, rows, kv_heads, length, head_dim], the engine's
    layout, so beam search reorders it with the engine's own gathers. Each [rows, kv_heads, length,
    head_dim] slice is contiguous, and a call binds it as both that layer's `past` and its `present`:
    the graph's attention reads the filled positions and writes the new ones into the cache itself.

    The graph ends with the LM head, so `__call__` returns the logits of the last position and
    `logits` is the identity: the runner's `logits(model(...))` gets the same values either way.
    """

    def __init__(self, graph: Any, embeddings: torch.Tensor, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 max_positions: int):  # fmt: skip
        self.graph = graph
        self.embeddings = embeddings
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_positions = max_positions
        self.past_names, self.present_names = past_names(num_layers), present_names(num_layers)

    dtype = torch.float32  # ONNX Runtime's CPU kernels run float32 activations (int8 weights too)
    device = torch.device("cpu")
    description = "ONNX Runtime"  # the decoding path, as `engine.backends` reports it

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]

    def new_cache(self, rows: int, length: int) -> torch.Tensor:
        """Uninitialised: the graph reads only positions it wrote (tests fill the rest with NaN), and
        zeroing a full-size cache is a measurable share of a decode."""
        shape = (self.num_layers, 2, rows, self.num_kv_heads, length, self.head_dim)
        return torch.empty(shape, dtype=self.dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [rows, 1, E] (the graph adds the positions)."""
        return F.embedding(tokens, self.embeddings).unsqueeze(1)

    def __call__(
        self, embeds: torch.Tensor, start: int, cache: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run `embeds` [rows, S, E] at positions start..start+S-1 against the cache's first
        `start` positions (ragged rows: each row's own, from `lengths`, see
        `engine.runner.DecoderForward`), store their keys and values in `cache`; returns the logits
        [rows, V]."""
        rows, length = embeds.shape[:2]
        if not cache.is_contiguous() or cache.dtype != self.dtype or start + length > cache.shape[4]:
            raise ValueError("the cache must be a contiguous float32 tensor with room for the new positions")
        inputs = embeds.to(self.dtype).contiguous().numpy()  # held until the run is over
        if lengths is None:
            lengths = torch.full((rows,), start + length)
        row_lengths = lengths.to(torch.int64).contiguous().numpy()
        binding = self.graph.io_binding()
        binding.bind_cpu_input("inputs_embeds", inputs)
        binding.bind_cpu_input("lengths", row_lengths)
        binding.bind_output("logits", "cpu")  # first, so it is get_outputs()[0]
        shape = list(cache.shape[2:])
        for buffer, past, present in zip(cache.flatten(0, 1), self.past_names, self.present_names, strict=True):
            binding.bind_input(past, "cpu", 0, np.float32, shape, buffer.data_ptr())
            binding.bind_output(present, "cpu", 0, np.float32, shape, buffer.data_ptr())
        self.graph.run_with_iobinding(binding)
        return torch.from_numpy(binding.get_outputs()[0].numpy()).squeeze(1)  # [rows, 1, V] -> [rows, V]

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The identity: `__call__` already returns logits (see the class docstring)."""
        return logits

    def refresh(self) -> None:
        """Nothing to do: the weights live in the graph and never change."""


class OnnxCaptionModel(CaptionGeneration):
    """An ONNX export, captioning with ONNX Runtime on CPU through the surface of `CaptionModel` that
    `Captioner` and the server use: `preprocessor`, `device`, `config` and the text side
    (`CaptionGeneration`: requests, prompts, stop tokens, `generate`, `caption`), which both share.
    This class provides what that needs: the encoder graph for the image prefix, the embedding
    matrix for prompt tokens, and the decoder graph as the engine's forward."""

    def __init__(self, directory: str | Path, manifest: Manifest, *, threads: int | None = None):
        """`manifest` is `read_manifest(directory)`'s; its numbers are checked against the graphs
        here, before anything is sized by them."""
        from PIL import Image
        from transformers import AutoTokenizer

        self.directory, self.manifest = Path(directory), manifest
        files = manifest.files
        self.config = manifest.caption_config
        self.preprocessor = ImagePreprocessor(load_image_processor(files["image_processor"]))
        self.tokenizer = hf_call(AutoTokenizer.from_pretrained, files["tokenizer"], "tokenizer")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.encoder = session(files["encoder"], threads=threads)
        graph = session(files["decoder"], threads=threads)
        image_size = tuple(self.preprocessor.pixels(Image.new("RGB", (640, 480))).shape[1:])
        check_graphs(manifest, self.encoder, graph, image_size=image_size)
        self.decoder = OrtDecoder(
            graph, read_embeddings(manifest), num_layers=manifest.num_layers, num_kv_heads=manifest.num_kv_heads,
            head_dim=manifest.head_dim, max_positions=manifest.max_positions,
        )  # fmt: skip
        self.quantize = manifest.quantize
        self._check_defaults()

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        quantize: str | None = None,
        threads: int | None = None,
    ) -> OnnxCaptionModel:
        """Load an export directory. Device, precision and quantization were fixed at export: the
        arguments are accepted when they agree (CPU; float32 or "auto"; the export's quantization)
        and refused with the reason otherwise."""
        if device is not None and torch.device(device).type != "cpu":
            raise UserError(
                f"{directory}: an ONNX export runs on CPU with ONNX Runtime; use the PyTorch model for {device}"
            )
        if dtype not in (None, "auto", "float32", torch.float32):
            raise UserError(f"{directory}: an ONNX export runs float32 activations; --dtype {dtype} does not apply")
        manifest = read_manifest(directory)
        if quantize is not None and quantize != manifest.quantize:
            raise UserError(
                f"{directory}: quantization is chosen at export (this export is "
                f"{manifest.quantize or 'not quantized'}); run prefixcap export onnx ... --quantize {quantize}"
            )
        return cls(directory, manifest, threads=threads)

    # ------------------------------------------------------------------ what Captioner reads
    device = torch.device("cpu")

    @property
    def precision(self) -> str:
        """For the CLI's `dtype:` line: what runs, and that the export fixed it."""
        if self.quantize:
            return f"float32 activations, {self.quantize} weights (ONNX export)"
        return "float32 (ONNX export)"

    @property
    def image_processor(self) -> Any:
        return self.preprocessor.processor

    def eval(self) -> OnnxCaptionModel:
        return self  # nothing trains: for `Captioner`, which calls model.eval()

    @property
    def max_new_tokens_limit(self) -> int:
        return self.decoder.max_positions - self.config.prefix_length

    # ------------------------------------------------------------------ inference
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder graph: normalised pixel values [B, 3, H, W] -> prefix embeddings [B, K, E]."""
        (prefix,) = self.encoder.run(None, {"pixel_values": pixel_values.float().contiguous().numpy()})
        return torch.from_numpy(prefix)

    def image_prefix(
        self, pixel_values: torch.Tensor | None, pixels: torch.Tensor | None, image_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """The encoder graph's prefix from uint8 `pixels` or float `pixel_values`. The export starts
        from pixels: `image_embeds` (a feature store's) need the PyTorch model."""
        if image_embeds is not None:
            raise UserError(
                "an ONNX export captions images from their pixels; stored image embeddings need the PyTorch model"
            )
        if (pixels is None) == (pixel_values is None):
            raise ValueError("pass exactly one of pixels or pixel_values")
        if pixels is not None:
            pixel_values = self.preprocessor.normalize(pixels.cpu())
        return self.encode(pixel_values.cpu())

    def token_embeddings(self, token_ids: list[int], like: torch.Tensor) -> torch.Tensor:
        return F.embedding(torch.tensor(token_ids), self.decoder.embeddings).to(like)
