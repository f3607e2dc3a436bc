"""A lean functional forward for Llama-family decoders, over the Hugging Face model's own parameters.

Llama 3.x and SmolLM2 (`LlamaForCausalLM`), Qwen2/2.5 (`Qwen2ForCausalLM`: q/k/v biases), Qwen3
(`Qwen3ForCausalLM`: RMSNorm of each query and key head) and Mistral (`MistralForCausalLM`) share
one block: RMSNorm, attention with rotary positions and grouped key/value heads, RMSNorm, SwiGLU
MLP. As `GPT2Forward` does for GPT-2, this runs that block directly against a static KV cache, so
each decode step is a short fixed sequence of kernels (what CUDA graph capture needs).

Exactness with HF `generate(inputs_embeds=...)`, which gives the prefix positions 0..K-1 and
continues from K:
- rotary cosines and sines come from the model's own `rotary_emb` module (its `inv_freq` and
  attention scaling, computed by transformers' `ROPE_INIT_FUNCTIONS`), so every RoPE type whose
  frequencies do not depend on the sequence length is reproduced: default, linear, llama3, yarn,
  proportional. "dynamic" and "longrope" recompute them from the length: refused (`unsupported_reason`);
- RMSNorm computes in float32 and casts back before the weight, as HF does;
- the cache keeps `num_key_value_heads` heads; a decode step folds each key/value head's query
  heads into query rows (HF's `pack_gqa`), the prefill uses SDPA's `enable_gqa`;
- sliding-window attention (Mistral, Qwen with `use_sliding_window`) equals full attention only
  while the whole sequence fits the window: `max_positions` is capped at the window, and
  `prefixcap.engine.backends.choose_backend` sends longer decodes to HF `generate`.

Parameters are used in place (no copies). A projection that is not a plain `nn.Linear` (an int8
`quantize_dynamic` Linear, see `prefixcap.system.hardware.quantize_int8`) is called as a module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from prefixcap.engine.cached import CachedForward
from prefixcap.engine.head import LMHead
from prefixcap.engine.ragged import key_mask, last_positions, write_positions

# The linear layers of a Llama-family block: what LoRA adapts by default.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# RoPE types whose frequencies and scaling are fixed at init (the others change with the length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")
_SILU = ("silu", "swish")

Weight = torch.Tensor | nn.Module  # a Linear weight [out, in], or a projection module


def unsupported_reason(decoder: nn.Module) -> str | None:
    """None if this forward reproduces `decoder`, a Llama-family class (`families.FAMILIES`),
    exactly (within `window`), else why not."""
    config = decoder.config
    if config.hidden_act not in _SILU:
        return f"hidden_act {config.hidden_act!r} is not SiLU"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} recomputes its frequencies from the sequence length"
    if type(decoder.lm_head) is not nn.Linear or decoder.lm_head.bias is not None:
        return "the LM head is not a plain Linear without bias"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return f"pretraining_tp={config.pretraining_tp}"
    return None


def window(decoder: nn.Module) -> int | None:
    """The sliding attention window of `decoder`, or None when every layer attends to all positions."""
    config = decoder.config
    size = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # Qwen2/3 keep a sliding_window value but use it only for sliding layers
    return size


class Block(NamedTuple):
    """One decoder layer's parameters, used in place. Projections are `Weight`s with their bias
    (None when there is none, or when the projection is a module that adds its own);
    `q_norm`/`k_norm` are Qwen3's per-head RMSNorm weights (None elsewhere)."""

    input_norm: torch.Tensor
    q: Weight
    q_bias: torch.Tensor | None
    k: Weight
    k_bias: torch.Tensor | None
    v: Weight
    v_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: Weight
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate: Weight
    gate_bias: torch.Tensor | None
    up: Weight
    up_bias: torch.Tensor | None
    down: Weight
    down_bias: torch.Tensor | None


def _projection(module: nn.Module) -> tuple[Weight, torch.Tensor | None]:
    """(weight, bias) of a plain `nn.Linear`; any other projection module is called as itself."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    return module, None


def block_parameters(layer: nn.Module) -> Block:
    attn, mlp = layer.self_attn, layer.mlp
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return Block(
        layer.input_layernorm.weight,
        *_projection(attn.q_proj),
        *_projection(attn.k_proj),
        *_projection(attn.v_proj),
        None if q_norm is None else q_norm.weight,
        None if k_norm is None else k_norm.weight,
        *_projection(attn.o_proj),
        layer.post_attention_layernorm.weight,
        *_projection(mlp.gate_proj),
        *_projection(mlp.up_proj),
        *_projection(mlp.down_proj),
    )


def project(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for a Linear weight, else the projection module's own call."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's `LlamaRMSNorm`: normalise in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's `apply_rotary_pos_emb` for one tensor: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention_input(
    x: torch.Tensor, block: Block, cos: torch.Tensor, sin: torch.Tensor, shape: tuple[int, ...], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input norm, q/k/v projections, per-head norms (Qwen3), rotary positions: [rows*S, E] ->
    q, k, v as [rows, S, heads, head_dim]. `shape` is (rows, S, head_dim); `cos`/`sin` broadcast to q
    ([S, 1, head_dim], or [rows, 1, 1, head_dim] for per-row positions)."""
    rows, length, head_dim = shape
    h = rms_norm(x, block.input_norm, eps)
    q = project(h, block.q, block.q_bias).view(rows, length, -1, head_dim)
    k = project(h, block.k, block.k_bias).view(rows, length, -1, head_dim)
    v = project(h, block.v, block.v_bias).view(rows, length, -1, head_dim)
    if block.q_norm is not None:
        q, k = rms_norm(q, block.q_norm, eps), rms_norm(k, block.k_norm, eps)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def block_output(x: torch.Tensor, attended: torch.Tensor, block: Block, eps: float) -> torch.Tensor:
    """Output projection, residual, post-attention norm, SwiGLU MLP, residual: [rows*S, E]."""
    x = x + project(attended, block.o, block.o_bias)
    h = rms_norm(x, block.post_norm, eps)
    h = F.silu(project(h, block.gate, block.gate_bias)) * project(h, block.up, block.up_bias)
    return x + project(h, block.down, block.down_bias)


class LlamaForward(CachedForward):
    """A Llama-family forward pass for decoding against a static KV cache (see `GPT2Forward`).

    The cache is one tensor [layers, 2 (key, value), rows, kv_heads, length, head_dim]. A call
    feeds `S` new positions starting at `start` for every row: the prefill feeds the whole prefix
    (start 0, causal), a decode step feeds one token (no mask: every cached position is visible).
    Rows of different lengths (`engine.ragged`) add a key mask and per-row positions to decode steps.
    `compile_blocks=True` compiles the position-independent parts of each block (norms, projections,
    rotary, MLP) with `torch.compile`; attention and the cache stay eager.
    """

    def __init__(self, model: nn.Module, *, compile_blocks: bool = False):
        config = model.config
        body = model.model
        attention = body.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.eps = config.rms_norm_eps
        sliding = window(model)
        self.max_positions = min(config.max_position_embeddings, sliding or config.max_position_embeddings)
        self.rotary = body.rotary_emb
        self.embedding = body.embed_tokens.weight
        self.norm = body.norm.weight
        self.lm_head = LMHead(model.lm_head.weight)
        self.blocks = [block_parameters(layer) for layer in body.layers]
        self.use_block_functions(attention_input, block_output, compile_blocks)

    def __call__(
        self, embeds: torch.Tensor, start: int, cache: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run `embeds` [rows, S, E] at positions start..start+S-1, writing their keys and values
        into `cache`; return the final hidden state of the last position, [rows, E] (normed). With
        `lengths` (ragged rows, see `runner.DecoderForward`), a decode step runs each row at its own
        position, lengths - 1, and attends to its first `lengths` positions only."""
        rows, length, width = embeds.shape
        end = start + length
        step = lengths is not None and length == 1  # a ragged decode step
        if step:
            positions = lengths - 1
            cos, sin = (t.unsqueeze(2) for t in self.rotary(embeds, positions.unsqueeze(1)))  # [rows, 1, 1, head_dim]
            mask = key_mask(lengths, end)
        else:
            positions = torch.arange(start, end, device=embeds.device).unsqueeze(0)
            cos, sin = (t[0].unsqueeze(1) for t in self.rotary(embeds, positions))  # [S, 1, head_dim] each
            mask = None
        shape = (rows, length, self.head_dim)
        x = embeds.reshape(rows * length, width)
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            q, k, v = self._attention_input(x, block, cos, sin, shape, self.eps)
            if step:
                write_positions(layer_cache, torch.stack((k, v)).transpose(2, 3), positions)
            else:
                layer_cache[0, :, :, start:end] = k.transpose(1, 2)
                layer_cache[1, :, :, start:end] = v.transpose(1, 2)
            keys, values = layer_cache[0, :, :, :end], layer_cache[1, :, :, :end]
            if length == 1:  # each key/value head's query heads become its query rows
                grouped = q.reshape(rows, self.num_kv_heads, self.groups, self.head_dim)
                attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scale)
                attended = attended.reshape(rows, -1)
            else:  # a prefill starts at 0, so its causal mask is the plain lower triangle (right padding included)
                attended = F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys, values, is_causal=True, scale=self.scale, enable_gqa=self.groups > 1
                )
                attended = attended.transpose(1, 2).reshape(rows * length, -1)
            x = self._block_output(x, attended, block, self.eps)
        last = last_positions(x.view(rows, length, width), None if step else lengths)
        return rms_norm(last, self.norm, self.eps)

    def refresh(self) -> None:
        """Bring the LM head's padded CUDA copy up to date (weights may have changed since capture)."""
        self.lm_head.refresh()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (tied or not): [rows, E] -> [rows, V], in the model's dtype."""
        return self.lm_head(hidden)
