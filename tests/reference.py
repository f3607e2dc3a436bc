"""Independent reference implementations the tests compare prefixcap against."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def naive_greedy(
    decoder: PreTrainedModel, prefix: torch.Tensor, max_new_tokens: int, stop_ids: list[int]
) -> list[list[int]]:
    """ClipCap's `generate2` loop: one row at a time, the whole sequence recomputed each step,
    no KV cache; the stop token is kept and ends the row."""
    wte = decoder.get_input_embeddings()
    captions = []
    for row in prefix:
        embeds, tokens = row.unsqueeze(0), []
        for _ in range(max_new_tokens):
            next_token = int(decoder(inputs_embeds=embeds).logits[0, -1].argmax())
            tokens.append(next_token)
            if next_token in stop_ids:
                break
            embeds = torch.cat([embeds, wte(torch.tensor([[next_token]]))], dim=1)
        captions.append(tokens)
    return captions


def strip_padding(ids: torch.Tensor, stop_ids: list[int]) -> list[list[int]]:
    """Rows of generated ids cut after their first stop token (the rest is padding)."""
    rows = []
    for row in ids.tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        rows.append(row[:cut])
    return rows
