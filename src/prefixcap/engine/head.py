"""The LM head of a decoder forward: the last hidden state to next-token logits.

On CUDA, cuBLAS's fast kernels need 16-byte aligned rows; a vocabulary that is not a multiple of
64 (GPT-2's 50257) makes them fall back to slow ones. There the head multiplies a copy of the
weight padded to a multiple of 64 rows (as nanoGPT pads 50257 to 50304) and returns a view of the
real entries. The copy is refreshed before every decode, since weights may change between decodes
(training); everywhere else the weight is used in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of the padded CUDA copy come in multiples of this.
PAD_ROWS_TO = 64


class LMHead:
    """`hidden [rows, E] -> logits [rows, V]` with `weight` [V, E] (tied or not), in its dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.vocab, width = weight.shape
        self.padded: torch.Tensor | None = None
        if weight.is_cuda and self.vocab % PAD_ROWS_TO:
            # filled by `refresh`, which every `DecodeRunner.run` calls before its first step
            self.padded = weight.new_zeros((-(-self.vocab // PAD_ROWS_TO) * PAD_ROWS_TO, width))

    def refresh(self) -> None:
        """Copy the live weight into the padded copy (a no-op where there is none)."""
        if self.padded is not None:
            self.padded[: self.vocab].copy_(self.weight)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.padded is None:
            return F.linear(hidden, self.weight)
        return F.linear(hidden, self.padded)[:, : self.vocab]
