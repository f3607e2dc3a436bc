"""Fast batched decoding from prefix embeddings for GPT-2 and Llama-family decoders.

`generate_from_prefix` is a drop-in for HF `generate(inputs_embeds=...)` on the decoders that
`supports` accepts (GPT-2; Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3, Mistral: see `families.family`):
it prefills the prefix once per input, keeps the KV cache in preallocated tensors, and runs
greedy, sampling and beam search batched, with finished rows masked. Steps never read values back
to the host; the loop only asks every few steps whether all rows have finished, to stop early. On
CUDA each step is replayed from a CUDA graph. Other decoders keep using HF `generate`;
`describe` says which path a decoder takes, in words.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch
from torch import nn

from prefixcap.engine.families import DecoderForward, decoder_forward, family, supports, unsupported_reason, window
from prefixcap.engine.runner import DecodeRunner
from prefixcap.engine.spec import DecodeSpec
from prefixcap.options import GenerationOptions

__all__ = ["DecodeSpec", "decode", "describe", "fits", "generate_from_prefix", "supports"]

# Graphed runners kept per decoder (each holds a KV cache for its batch size).
MAX_CACHED_RUNNERS = 4

_runners: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, DecodeRunner]] = weakref.WeakKeyDictionary()
_runners_lock = threading.Lock()  # graphed runners own shared buffers: one decode at a time


def fits(decoder: nn.Module, length: int) -> bool:
    """Whether a decode over `length` positions (prefix + max_new_tokens - 1) stays where the engine
    equals HF: within the sliding window of a decoder that has one (Mistral); always otherwise
    (the decoder's own position limit is checked when decoding starts)."""
    size = window(decoder)
    return size is None or length <= size


def describe(decoder: nn.Module, length: int | None = None) -> str:
    """Which path generates with `decoder`, in a few words for logs and benchmarks:
    "prefixcap engine (llama)", or "HF generate (PhiForCausalLM: not supported by the engine)".
    With `length` (see `fits`), also whether a decode that long stays on the engine."""
    name = type(decoder).__name__
    if not supports(decoder):
        return f"HF generate ({name}: {unsupported_reason(decoder) or 'not supported by the engine'})"
    if length is not None and not fits(decoder, length):
        return f"HF generate ({name}: {length} positions exceed its {window(decoder)}-position sliding window)"
    return f"prefixcap engine ({family(decoder)})"


@torch.no_grad()
def generate_from_prefix(
    decoder: nn.Module,
    prefix_embeds: torch.Tensor,
    options: GenerationOptions,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    cuda_graphs: bool = True,
    compile_blocks: bool = False,
) -> torch.Tensor:
    """New token ids [B * num_return_sequences, T] continuing `prefix_embeds` [B, K, E].

    Rows keep their stop token (any of `eos_token_ids`) and are padded with `pad_token_id` after
    it; T is the longest row. Sampling is reproducible for a fixed `options.seed`. On CUDA, steps
    run as CUDA graphs unless `cuda_graphs=False`, and `compile_blocks=True` also fuses the
    blocks' elementwise work with `torch.compile` (slow to start, faster per step).
    """
    if not supports(decoder):
        raise ValueError(f"the decoding engine cannot run {type(decoder).__name__}: {unsupported_reason(decoder)}")
    batch, prefix_length, _ = prefix_embeds.shape
    length = prefix_length + options.max_new_tokens - 1  # the last token is never fed back
    if not fits(decoder, length):
        raise ValueError(
            f"prefix ({prefix_length}) + max_new_tokens ({options.max_new_tokens}) exceeds the "
            f"{window(decoder)}-position sliding window of {type(decoder).__name__}: the engine decodes "
            "within the window only (HF generate decodes past it)"
        )
    prefix_embeds = prefix_embeds.to(decoder.device, decoder.dtype)
    # Decoding runs in the decoder's own dtype. Under a caller's autocast (training validation),
    # captured graphs would read autocast's cached weight copies, which are freed when it exits.
    with torch.autocast(decoder.device.type, enabled=False):
        if decoder.device.type != "cuda" or not cuda_graphs:
            forward = decoder_forward(decoder, compile_blocks=compile_blocks)
            return decode(forward, prefix_embeds, options, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)

        # Runners hold a power-of-two batch (extra rows are padding) so that a few captured shapes
        # serve every batch size.
        capacity = 1 << (batch - 1).bit_length()
        spec, seed = _spec_and_seed(options, eos_token_ids, pad_token_id)
        with _runners_lock:
            runner = _graphed_runner(decoder, spec, capacity, prefix_length, compile_blocks)
            return runner.run(prefix_embeds, seed)


@torch.no_grad()
def decode(
    forward: DecoderForward,
    prefix_embeds: torch.Tensor,
    options: GenerationOptions,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
) -> torch.Tensor:
    """New token ids, as `generate_from_prefix`, on any forward object (`engine.forward`): a torch
    decoder's, or an ONNX Runtime session's (`prefixcap.onnx.runtime.OrtDecoder`); eager steps."""
    spec, seed = _spec_and_seed(options, eos_token_ids, pad_token_id)
    batch, prefix_length, _ = prefix_embeds.shape
    return DecodeRunner(forward, spec, batch, prefix_length).run(prefix_embeds.to(forward.dtype), seed)


def _spec_and_seed(
    options: GenerationOptions, eos_token_ids: list[int], pad_token_id: int
) -> tuple[DecodeSpec, int | None]:
    """The normalised request, and the sampling seed: the options' own, or (sampling without one)
    one drawn from torch's global RNG, so that torch.manual_seed applies."""
    spec = DecodeSpec.from_options(options, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
    seed = options.seed
    if spec.do_sample and seed is None:
        seed = int(torch.randint(2**62, ()))
    return spec, seed


def _graphed_runner(
    decoder: nn.Module, spec: DecodeSpec, batch: int, prefix_length: int, compile_blocks: bool
) -> DecodeRunner:
    """A captured runner for this shape, from the per-decoder cache (least recently used out).
    The key includes the weights' address and dtype: graphs read the weights in place."""
    weights = decoder.get_input_embeddings().weight
    key = (spec, batch, prefix_length, compile_blocks, weights.data_ptr(), weights.dtype)
    runners = _runners.setdefault(decoder, OrderedDict())
    if key in runners:
        runners.move_to_end(key)
        return runners[key]
    runner = DecodeRunner(decoder_forward(decoder, compile_blocks=compile_blocks), spec, batch, prefix_length)
    runner.capture()
    runners[key] = runner
    if len(runners) > MAX_CACHED_RUNNERS:
        runners.popitem(last=False)
    return runner
