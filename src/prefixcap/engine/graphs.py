"""Decode runners captured as CUDA graphs, kept per decoder and shape: capturing costs a warm-up and
one recording per step, replaying costs nothing, so each (spec, batch, prefix length, ragged or
not) is captured once and replayed for every later decode of that shape."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from prefixcap.engine.runner import DecoderForward, DecodeRunner
from prefixcap.engine.spec import DecodeSpec

# Graphed runners kept per decoder (each holds a KV cache for its batch size).
MAX_CACHED_RUNNERS = 4

_runners: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, DecodeRunner]] = weakref.WeakKeyDictionary()
_runners_lock = threading.Lock()  # graphed runners own shared buffers: one decode at a time


def run_graphed(
    decoder: nn.Module, new_forward: Callable[[], DecoderForward], spec: DecodeSpec, prefix_embeds: torch.Tensor,
    seed: int | None, compile_blocks: bool, lengths: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Decode on a captured runner for this shape (`new_forward` makes the decoder's forward when
    one must be captured). Runners hold a power-of-two batch (extra rows are padding), so that a few
    captured shapes serve every batch size. `lengths`: ragged rows (`engine.ragged`), whose
    runners keep the lengths in buffers: one capture serves any lengths up to the prefix length."""
    batch, prefix_length, _ = prefix_embeds.shape
    capacity = 1 << (batch - 1).bit_length()
    with _runners_lock:
        runner = _runner(decoder, new_forward, spec, capacity, prefix_length, compile_blocks, lengths is not None)
        return runner.run(prefix_embeds, seed, lengths)


def _runner(
    decoder: nn.Module, new_forward: Callable[[], DecoderForward], spec: DecodeSpec, batch: int, prefix_length: int,
    compile_blocks: bool, ragged: bool,
) -> DecodeRunner:  # fmt: skip
    """A captured runner for this shape, from the per-decoder cache (least recently used out).
    The key includes the weights' address and dtype: graphs read the weights in place."""
    weights = decoder.get_input_embeddings().weight
    key = (spec, batch, prefix_length, ragged, compile_blocks, weights.data_ptr(), weights.dtype)
    runners = _runners.setdefault(decoder, OrderedDict())
    if key in runners:
        runners.move_to_end(key)
        return runners[key]
    runner = DecodeRunner(new_forward(), spec, batch, prefix_length, ragged=ragged)
    runner.capture()
    runners[key] = runner
    if len(runners) > MAX_CACHED_RUNNERS:
        runners.popitem(last=False)
    return runner
