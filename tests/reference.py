"""Independent reference implementations the tests compare prefixcap against, and a checkpoint in
ClipCap's own format to import."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GPT2LMHeadModel, PreTrainedModel


def captions_one_by_one(captioner: Any, images: Sequence[Any], **options: Any) -> list[list[str]]:
    """Each image's captions from a batch of its own: a reference that no mix-up within a batch
    (captions or images handed to a neighbour) can reach. Asserts the precondition that makes it
    worth comparing with: distinct images get distinct captions (an image-dependent test model)."""
    captions = [captioner([image], **options)[0] for image in images]
    assert_distinct(captions)
    return captions


def assert_distinct(captions: Sequence[Any]) -> None:
    """Distinct images must get distinct captions, or a test comparing them cannot see a mix-up."""
    keys = [tuple(per_image) if isinstance(per_image, list) else per_image for per_image in captions]
    assert len(set(keys)) == len(keys), f"the test model gave two images the same captions: {captions}"


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


PREFIX_LENGTH = 5  # of the checkpoints make_clipcap_checkpoint writes


def make_clipcap_checkpoint(gpt2_dir, path, seed=0):
    """A checkpoint with ClipCap's exact keys, including the legacy attention buffers."""
    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    hidden, embed = gpt.config.n_embd, 24
    width = hidden * PREFIX_LENGTH
    state = {
        "clip_project.model.0.weight": torch.randn(width // 2, embed) * 0.2,
        "clip_project.model.0.bias": torch.randn(width // 2) * 0.1,
        "clip_project.model.2.weight": torch.randn(width, width // 2) * 0.2,
        "clip_project.model.2.bias": torch.randn(width) * 0.1,
    }
    for key, value in gpt.state_dict().items():
        state[f"gpt.{key}"] = value + 0.01 * torch.randn_like(value)  # "fine-tuned" GPT-2
    for layer in range(gpt.config.n_layer):
        state[f"gpt.transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 96, 96))
        state[f"gpt.transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, path)
    return state
