"""A lean functional GPT-2 forward over a Hugging Face `GPT2LMHeadModel`'s own parameters.

Decoding needs three things from the model: add positions, run the blocks against a KV cache, and
project the last hidden state to logits. Doing that directly, instead of through `model.forward`,
makes each decode step a short, fixed sequence of kernels with static shapes (what CUDA graph
capture needs), keeps all layers' KV cache in one preallocated tensor that beam search can reorder
with one gather, and lets attention read only the filled part of the cache without a mask.

The parameters are used in place (no copies), so the forward follows the module's device, dtype
and any in-place weight update.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from prefixcap.engine.cached import CachedForward
from prefixcap.engine.head import LMHead
from prefixcap.engine.ragged import key_mask, last_positions, write_positions

# Activations that equal GPT-2's `gelu_new` (the tanh approximation of GELU).
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


# The linear layers of a GPT-2 block (HF Conv1D modules): what LoRA adapts by default.
LINEARS = ("c_attn", "c_proj", "c_fc")


def unsupported_reason(decoder: nn.Module) -> str | None:
    """None if the config of `decoder`, a `GPT2LMHeadModel`, is one this forward reproduces exactly,
    else why not."""
    config = decoder.config
    if config.activation_function not in _TANH_GELU:
        return f"activation_function {config.activation_function!r} is not the tanh GELU"
    for flag, wanted in [
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
    ]:
        if bool(getattr(config, flag)) != wanted:
            return f"{flag}={getattr(config, flag)}"
    return None


# One block's parameter names in an HF GPT-2 layer, in `Block` field order.
BLOCK_PARAMETERS = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)  # fmt: skip


class Block(NamedTuple):
    """One transformer block's parameters. Linear weights are HF Conv1D weights, [in, out]; a
    projection that is another module (an int8 `quantize_dynamic` Linear, see
    `prefixcap.system.hardware.quantize_int8`) is kept as that module, with bias None: it adds its own."""

    ln_1_weight: torch.Tensor
    ln_1_bias: torch.Tensor
    attn_weight: torch.Tensor | nn.Module
    attn_bias: torch.Tensor | None
    attn_proj_weight: torch.Tensor | nn.Module
    attn_proj_bias: torch.Tensor | None
    ln_2_weight: torch.Tensor
    ln_2_bias: torch.Tensor
    fc_weight: torch.Tensor | nn.Module
    fc_bias: torch.Tensor | None
    mlp_proj_weight: torch.Tensor | nn.Module
    mlp_proj_bias: torch.Tensor | None


def project(x: torch.Tensor, weight: torch.Tensor | nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight + bias for a Conv1D weight, else the projection module's own call."""
    if isinstance(weight, torch.Tensor):
        return torch.addmm(bias, x, weight)
    return weight(x)


def attention_input(x: torch.Tensor, block: Block, eps: float) -> torch.Tensor:
    """ln_1 then the fused q/k/v projection: [rows, E] -> [rows, 3E]."""
    h = F.layer_norm(x, x.shape[-1:], block.ln_1_weight, block.ln_1_bias, eps)
    return project(h, block.attn_weight, block.attn_bias)


def block_output(x: torch.Tensor, attended: torch.Tensor, block: Block, eps: float) -> torch.Tensor:
    """Attention output projection, residual, ln_2, MLP with tanh-GELU, residual: [rows, E]."""
    x = x + project(attended, block.attn_proj_weight, block.attn_proj_bias)
    h = F.layer_norm(x, x.shape[-1:], block.ln_2_weight, block.ln_2_bias, eps)
    h = F.gelu(project(h, block.fc_weight, block.fc_bias), approximate="tanh")
    return x + project(h, block.mlp_proj_weight, block.mlp_proj_bias)


def block_parameters(layer: nn.Module) -> Block:
    """A `Block` of an HF GPT-2 layer's parameters, used in place; a projection that is not a
    `Conv1D` (an int8 Linear) is called as a module."""
    from transformers.pytorch_utils import Conv1D

    values: list[torch.Tensor | nn.Module | None] = []
    for name in BLOCK_PARAMETERS:
        owner, _, kind = name.rpartition(".")
        module = layer.get_submodule(owner)
        if isinstance(module, (nn.LayerNorm, Conv1D)):
            values.append(module.get_parameter(kind))
        else:
            values.append(module if kind == "weight" else None)
    return Block(*values)


class GPT2Forward(CachedForward):
    """GPT-2's forward pass for decoding against a static KV cache.

    The cache is one tensor [layers, 2 (key, value), rows, heads, length, head_dim]. A call feeds
    `S` new positions starting at `start` for every row: the prefill feeds the whole prefix
    (start 0, causal), a decode step feeds one token (no mask: every cached position is visible).
    Rows of different lengths (`engine.ragged`) add a key mask and per-row positions to decode steps.

    `compile_blocks=True` compiles the position-independent parts of each block with `torch.compile`
    (fusing layer norms, GELU and residual adds); attention and the cache stay eager, so the
    compiled code sees only fixed shapes (one compilation per batch size, for prefill and decode).
    """

    def __init__(self, model: nn.Module, *, compile_blocks: bool = False):
        config = model.config
        transformer = model.transformer
        self.num_heads = self.num_kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.max_positions = config.n_positions
        self.eps = config.layer_norm_epsilon
        self.embedding = transformer.wte.weight
        self.wpe = transformer.wpe.weight
        self.ln_f = (transformer.ln_f.weight, transformer.ln_f.bias)
        self.lm_head = LMHead(model.lm_head.weight)
        self.blocks = [block_parameters(layer) for layer in transformer.h]
        self.use_block_functions(attention_input, block_output, compile_blocks)

    def __call__(
        self, embeds: torch.Tensor, start: int, cache: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run `embeds` [rows, S, E] at positions start..start+S-1, writing their keys and values
        into `cache`; return the final hidden state of the last position, [rows, E]. With
        `lengths` (ragged rows, see `runner.DecoderForward`), a decode step runs each row at its own
        position, lengths - 1, and attends to its first `lengths` positions only."""
        rows, length, width = embeds.shape
        end = start + length
        step = lengths is not None and length == 1  # a ragged decode step
        if step:
            positions = lengths - 1
            x = embeds.reshape(rows, width) + F.embedding(positions, self.wpe)
            mask = key_mask(lengths, end)
        else:
            x = (embeds + self.wpe[start:end]).view(rows * length, width)
            mask = None
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            qkv = self._attention_input(x, block, self.eps)
            # [rows*S, 3E] -> [3 (q, k, v), rows, heads, S, head_dim], a view
            qkv = qkv.view(rows, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            if step:
                write_positions(layer_cache, qkv[1:], positions)
            else:
                layer_cache[:, :, :, start:end] = qkv[1:]
            # A prefill starts at 0, so its causal mask is the plain lower triangle (right-padded
            # rows included: a real position never sees the padding after it)
            attended = F.scaled_dot_product_attention(
                qkv[0], layer_cache[0, :, :, :end], layer_cache[1, :, :, :end], attn_mask=mask, is_causal=length > 1
            )
            attended = attended.transpose(1, 2).reshape(rows * length, width)
            x = self._block_output(x, attended, block, self.eps)
        last = last_positions(x.view(rows, length, width), None if step else lengths)
        return F.layer_norm(last, last.shape[-1:], *self.ln_f, self.eps)

    def refresh(self) -> None:
        """Bring the LM head's padded CUDA copy up to date (weights may have changed since
        capture, e.g. during training)."""
        self.lm_head.refresh()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied LM head: [rows, E] -> [rows, V], in the model's dtype."""
        return self.lm_head(hidden)
