"""What the torch forwards (`gpt2.GPT2Forward`, `llama.LlamaForward`) share: the decoder's own
token embeddings, used in place; a KV cache laid out [layers, 2 (key, value), rows, kv_heads,
length, head_dim]; and the two position-independent halves of a block, optionally compiled."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class CachedForward:
    embedding: torch.Tensor  # the token embeddings [V, E], the model's own tensor
    blocks: list  # one NamedTuple of parameters per layer
    num_kv_heads: int  # key/value heads held in the cache
    head_dim: int

    def use_block_functions(self, attention_input: Callable, block_output: Callable, compile_blocks: bool) -> None:
        """The block's halves around attention; `compile_blocks` fuses their elementwise work with
        `torch.compile` (attention and the cache stay eager, so it sees fixed shapes only)."""
        self._attention_input, self._block_output = attention_input, block_output
        if compile_blocks:
            self._attention_input = torch.compile(attention_input, dynamic=False)
            self._block_output = torch.compile(block_output, dynamic=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @property
    def hidden_size(self) -> int:
        return self.embedding.shape[1]

    def new_cache(self, rows: int, length: int) -> torch.Tensor:
        shape = (len(self.blocks), 2, rows, self.num_kv_heads, length, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [rows, 1, E] for a decode step."""
        return F.embedding(tokens, self.embedding).unsqueeze(1)
