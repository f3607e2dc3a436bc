"""Rows of different prefix lengths in one batch (an image prefix followed by each row's own prompt).

The convention, shared by every backend's caller: prefix embeddings [B, K, E] are right-padded,
and `lengths` [B] gives each row's real positions (its first `lengths[b]` entries; the rest is
padding, of any finite value). None means every row is K long, the fast path that needs no mask.

The engine keeps the rows right-padded in its KV cache too, which is what ONNX Runtime's
GroupQueryAttention does with its per-row `seqlens_k`: a row's positions always start at 0, so the
prefill is the plain causal prefill (a real position never sees a later pad) and only a decode
step needs per-row positions and a key mask. HF `generate` wants left padding and an attention
mask instead (`left_padded`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_lengths(
    prefix_embeds: torch.Tensor, lengths: Sequence[int] | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`prefix_embeds` cropped to the longest row, `lengths` as a CPU int64 tensor), or
    (`prefix_embeds`, None) when every row fills it: the equal-length path. ValueError for lengths
    that are not one per row, each within 1..K."""
    if lengths is None:
        return prefix_embeds, None
    lengths = torch.as_tensor(lengths).to("cpu", torch.long)
    batch, width = prefix_embeds.shape[:2]
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must hold one length per row ({batch}), got shape {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > width):
        raise ValueError(f"row lengths must be within 1..{width} (the prefix positions), got {lengths.tolist()}")
    longest = int(lengths.max()) if batch else width
    if bool((lengths == longest).all()):
        return prefix_embeds[:, :longest], None
    return prefix_embeds[:, :longest], lengths


def left_padded(prefix_embeds: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows moved to the right end, zeros before them, and the attention mask (1 on
    the real positions): what HF `generate` continues from, every row ending at the last position."""
    batch, width, hidden = prefix_embeds.shape
    lengths = lengths.to(prefix_embeds.device)
    source = torch.arange(width, device=prefix_embeds.device) - (width - lengths).unsqueeze(1)  # [B, K]
    real = source >= 0
    shifted = prefix_embeds.gather(1, source.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden))
    return shifted * real.unsqueeze(-1).to(prefix_embeds.dtype), real.long()


def last_positions(states: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Each row's state at its last real position, [rows, E], from `states` [rows, S, E]."""
    if lengths is None:
        return states[:, -1]
    index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
    return states.gather(1, index).squeeze(1)


def key_mask(lengths: torch.Tensor, end: int) -> torch.Tensor:
    """Which of the first `end` cache positions each row attends to, as an SDPA mask [rows, 1, 1, end]."""
    visible = torch.arange(end, device=lengths.device) < lengths.unsqueeze(1)
    return visible.view(lengths.shape[0], 1, 1, end)


def write_positions(layer_cache: torch.Tensor, keys_values: torch.Tensor, positions: torch.Tensor) -> None:
    """Store one new position per row: `keys_values` [2, rows, kv_heads, 1, head_dim] at `positions`
    [rows] of one layer's cache [2, rows, kv_heads, L, head_dim] (a scatter: no host sync, so a
    CUDA graph can replay it with new positions)."""
    index = positions.view(1, -1, 1, 1, 1).expand_as(keys_values)
    layer_cache.scatter_(3, index, keys_values)
