"""Fast batched decoding from prefix embeddings for GPT-2 and Llama-family decoders.

`generate` continues prefix embeddings on a decoder of a family the engine runs (`families`:
GPT-2; Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3, Mistral), or on any `runner.DecoderForward` (a
forward on another runtime, such as ONNX Runtime): it prefills the prefix once per input, keeps
the KV cache in preallocated tensors, and runs greedy, sampling and beam search batched, with
finished rows masked; rows may differ in prefix length (`ragged`). Steps never read values back to the host; the loop only asks every few
steps whether all rows have finished, to stop early. On CUDA each step is replayed from a CUDA
graph (`graphs`). Which decoder runs on the engine and which on HF `generate` is decided in one
place, `backends.choose_backend`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prefixcap.engine.families import FAMILIES, DecoderFamily, engine_support, family_of
from prefixcap.engine.graphs import run_graphed
from prefixcap.engine.ragged import check_lengths
from prefixcap.engine.runner import DecoderForward, DecodeRunner
from prefixcap.engine.spec import DecodeSpec

__all__ = ["FAMILIES", "DecodeSpec", "DecoderFamily", "DecoderForward", "engine_support", "family_of", "generate"]


@torch.no_grad()
def generate(
    decoder: nn.Module | DecoderForward,
    prefix_embeds: torch.Tensor,
    spec: DecodeSpec,
    *,
    lengths: Sequence[int] | torch.Tensor | None = None,
    cuda_graphs: bool = True,
    compile_blocks: bool = False,
) -> torch.Tensor:
    """New token ids [B * rows_per_input, T] continuing `prefix_embeds` [B, K, E].

    `decoder` is a Hugging Face decoder of a family the engine runs, or a forward object on
    another runtime (decoded eagerly). Rows keep their stop token (any of `spec.stop_token_ids`)
    and are padded with `spec.pad_token_id` after it; T is the longest row. `lengths` [B] gives
    rows of different lengths, right-padded (`engine.ragged`); they decode in the same batch, as
    each would alone. Sampling is reproducible for a fixed `spec.options.seed`. On CUDA, steps run
    as CUDA graphs unless `cuda_graphs=False`, and `compile_blocks=True` also fuses the blocks'
    elementwise work with `torch.compile` (slow to start, faster per step).
    """
    prefix_embeds, lengths = check_lengths(prefix_embeds, lengths)
    ragged = lengths is not None
    seed = spec.options.seed
    if spec.options.do_sample and seed is None:  # one from torch's global RNG, so that torch.manual_seed applies
        seed = int(torch.randint(2**62, ()))
    if not isinstance(decoder, nn.Module):
        batch, prefix_length, _ = prefix_embeds.shape
        runner = DecodeRunner(decoder, spec, batch, prefix_length, ragged=ragged)
        return runner.run(prefix_embeds.to(decoder.dtype), seed, lengths)
    family, reason = engine_support(decoder)
    if family is None or reason is not None:
        raise ValueError(f"the decoding engine cannot run {type(decoder).__name__}: {reason}")
    window = family.window(decoder)
    if window is not None and prefix_embeds.shape[1] + spec.options.max_new_tokens - 1 > window:
        raise ValueError(
            f"prefix ({prefix_embeds.shape[1]}) + max_new_tokens ({spec.options.max_new_tokens}) exceeds the "
            f"{window}-position sliding window of {type(decoder).__name__}: the engine decodes within the window "
            "only (HF generate decodes past it)"
        )
    prefix_embeds = prefix_embeds.to(decoder.device, decoder.dtype)

    def new_forward() -> DecoderForward:
        return family.forward(decoder, compile_blocks=compile_blocks)

    # Decoding runs in the decoder's own dtype. Under a caller's autocast (training validation),
    # captured graphs would read autocast's cached weight copies, which are freed when it exits.
    with torch.autocast(decoder.device.type, enabled=False):
        if decoder.device.type == "cuda" and cuda_graphs:
            return run_graphed(decoder, new_forward, spec, prefix_embeds, seed, compile_blocks, lengths)
        batch, prefix_length, _ = prefix_embeds.shape
        return DecodeRunner(new_forward(), spec, batch, prefix_length, ragged=ragged).run(prefix_embeds, seed, lengths)
