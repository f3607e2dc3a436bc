"""Generation from prefix embeddings. The decoding options live in `prefixcap.options`;
`GenerationOptions` is re-exported here, where callers have always imported it from."""

from __future__ import annotations

import dataclasses

import torch
from transformers import PreTrainedModel

from prefixcap import engine
from prefixcap.options import GenerationOptions

__all__ = ["GenerationOptions", "generate_from_prefix"]


def generate_from_prefix(
    decoder: PreTrainedModel,
    prefix_embeds: torch.Tensor,
    options: GenerationOptions,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
) -> torch.Tensor:
    """New token ids [B * num_return_sequences, T] continuing `prefix_embeds` [B, K, E]; rows are
    padded with `pad_token_id` after their stop token, which is kept.

    GPT-2 decoders run on prefixcap's decoding engine (`prefixcap.engine`: the same tokens as HF
    `generate` for greedy and beam search, faster, most of all on CUDA); other decoders use HF
    `generate`."""
    if engine.supports(decoder):
        return engine.generate_from_prefix(
            decoder, prefix_embeds, options, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id
        )
    if options.seed is not None:
        torch.manual_seed(options.seed)
    attention_mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device)
    kwargs = dataclasses.asdict(options)
    kwargs.pop("seed")
    # HF warns about options the chosen mode ignores: drop them
    if not options.do_sample:
        for name in ("temperature", "top_k", "top_p"):
            kwargs.pop(name)
    if options.num_beams == 1:
        for name in ("length_penalty", "early_stopping"):
            kwargs.pop(name)
    return decoder.generate(
        inputs_embeds=prefix_embeds,
        attention_mask=attention_mask,
        eos_token_id=eos_token_ids,
        pad_token_id=pad_token_id,
        **kwargs,
    )
