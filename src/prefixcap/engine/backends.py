"""Generation from prefix embeddings. The decoding options live in `prefixcap.options`;
`GenerationOptions` is re-exported here, where callers have always imported it from."""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref

import torch
from transformers import PreTrainedModel

from prefixcap import engine
from prefixcap.options import GenerationOptions

__all__ = ["GenerationOptions", "generate_from_prefix"]

logger = logging.getLogger("prefixcap")

# The path last logged per decoder: each decoder's path is logged once, and again if it changes
# (a decode longer than a sliding window moves to HF generate).
_logged_paths: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_logged_lock = threading.Lock()


def _log_path(decoder: torch.nn.Module, path: str) -> None:
    with _logged_lock:
        if _logged_paths.get(decoder) == path:
            return
        _logged_paths[decoder] = path
    logger.info("generating with %s", path)


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

    GPT-2 and Llama-family decoders run on prefixcap's decoding engine (`prefixcap.engine`: the
    same tokens as HF `generate` for greedy and beam search, faster, most of all on CUDA); other
    decoders, and decodes longer than a decoder's sliding window, use HF `generate`. The path
    taken (`engine.describe`) is logged at INFO once per decoder."""
    length = prefix_embeds.shape[1] + options.max_new_tokens - 1
    _log_path(decoder, engine.describe(decoder, length))
    if engine.supports(decoder) and engine.fits(decoder, length):
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
