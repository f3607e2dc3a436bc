"""Attention for the exported decoder graph: ONNX Runtime's GroupQueryAttention (com.microsoft),
whose KV cache can be one buffer that the step appends to in place.

The Hugging Face attention concatenates each layer's past and new keys/values at every step: a
copy of the whole cache per step, which grows with the caption. GroupQueryAttention instead writes
the new positions into the `past_key`/`past_value` buffer when that buffer is also bound as the
`present` output (ONNX Runtime calls this sharing the past/present buffer); `onnx.runtime.OrtDecoder`
binds the decoding engine's own cache there, so nothing is copied and beam search reorders the
cache as for any forward. Unshared, the op returns past + new as usual, which is how other
runtimes can run it (see the manifest's usage).

The step time then no longer grows with the caption (measurements:
benchmarks/results/cpu-2026-11-29/notes.md).

The graph gets the op through three official extension points, so any decoder whose attention
module calls `ALL_ATTENTION_FUNCTIONS` (GPT-2, the Llama family) exports the same way:
- a PyTorch custom op, `prefixcap::group_query_attention`, whose eager body is the reference
  semantics (tests compare it with the decoder's own attention) and whose fake body gives shapes;
- its translation to the ONNX op (`TRANSLATION`, for `torch.onnx.export(custom_translation_table=)`);
- a transformers attention implementation, `ATTENTION` (see `attention_of`), that calls the op
  with the layer's buffers, passed to the forward in the `shared_kv` keyword (a `SharedKV`); the
  causal mask is the op's own, and rows of different lengths are the op's right-padded rows
  (per-row `seqlens_k`, from the graph's `lengths` input).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION = "prefixcap_onnx"  # the transformers attention implementation's name


@torch.library.custom_op("prefixcap::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_length: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention on unshared buffers: query [B, S, heads * D], key and value
    [B, S, kv_heads * D] for the new positions, past_key/value [B, kv_heads, P, D]; returns the
    attention output [B, S, heads * D] and present_key/value [B, kv_heads, P + S, D].

    Rows may differ in length, right-padded as the op's `seqlens_k` has them: row b holds
    seqlens_k[b] + 1 positions after the step. A prefill (no past, every row at most S long) gives
    row b new positions 0 .. seqlens_k[b] (the rest of its S are padding); any other step appends
    the row's S new positions after its own past, seqlens_k[b] + 1 - S positions (the rest of P is
    padding). Causal: new position i of row b sees its positions up to its past + i. Outputs at a
    row's padding are unspecified. `total_length` (the longest row's) is the op's own input, for
    its shared-buffer form; here P + S is the present's length."""
    rows, length, _ = query.shape
    head_dim = past_key.shape[-1]

    def heads(states: torch.Tensor, count: int) -> torch.Tensor:
        return states.view(rows, length, count, head_dim).transpose(1, 2)

    past = past_key.shape[2]
    past_lengths = (seqlens_k.long() + 1 - length).clamp(min=0)  # [B]
    new_positions = (past_lengths.unsqueeze(1) + torch.arange(length)).clamp(max=past + length - 1)  # [B, S]
    index = new_positions.view(rows, 1, length, 1).expand(-1, kv_num_heads, -1, head_dim)

    def present(past_states: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        room = torch.cat([past_states, past_states.new_zeros(rows, kv_num_heads, length, head_dim)], dim=2)
        return room.scatter(2, index, heads(states, kv_num_heads))

    present_key, present_value = present(past_key, key), present(past_value, value)
    visible = torch.arange(past + length).view(1, 1, -1) <= new_positions.unsqueeze(2)  # [B, S, P + S]
    output = F.scaled_dot_product_attention(
        heads(query, num_heads), present_key, present_value, attn_mask=visible.unsqueeze(1), scale=scale,
        enable_gqa=num_heads != kv_num_heads,
    )  # fmt: skip
    return output.transpose(1, 2).reshape(rows, length, -1), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_length, num_heads, kv_num_heads, scale):
    present = past_key.new_empty(
        (past_key.shape[0], past_key.shape[1], past_key.shape[2] + query.shape[1], past_key.shape[3])
    )
    return query.new_empty(query.shape), present, torch.empty_like(present)


def _gqa_schema() -> object:
    """The part of ONNX Runtime's GroupQueryAttention schema the export uses (the onnx package
    holds no contrib-op schemas, and onnxscript needs one to build the node)."""
    from onnx.defs import OpSchema

    def parameters(names: str, type_name: str) -> list[OpSchema.FormalParameter]:
        return [OpSchema.FormalParameter(name, type_name) for name in names.split()]

    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=parameters("query key value past_key past_value", "T") + parameters("seqlens_k total_sequence_length", "M"),
        outputs=parameters("output present_key present_value", "T"),
        type_constraints=[("T", ["tensor(float)"], "activations"), ("M", ["tensor(int32)"], "lengths")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT),
            OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, required=False),
        ],
    )  # fmt: skip


def _to_onnx(query, key, value, past_key, past_value, seqlens_k, total_length, num_heads, kv_num_heads, scale):
    """The custom op as ONNX Runtime's contrib op (an onnxscript function for the exporter)."""
    import onnxscript

    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())
    return gqa(
        query, key, value, past_key, past_value, seqlens_k, total_length,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale,
    )  # fmt: skip


TRANSLATION = {torch.ops.prefixcap.group_query_attention.default: _to_onnx}


@dataclass
class SharedKV:
    """One step's cache for the graph: per layer its past keys and values [rows, kv_heads, P, D]
    and each row's positions after this step; `present` collects each layer's outputs."""

    past: list[torch.Tensor]  # past.0.key, past.0.value, past.1.key, ...
    lengths: torch.Tensor  # int64 [rows]: each row's positions after this step (right-padded rows)
    present: list[torch.Tensor] = field(default_factory=list)


def shared_kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    shared_kv: SharedKV,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """A transformers attention implementation (the `attention_interface` signature): query
    [B, heads, S, D] and the new positions' key/value [B, kv_heads, S, D] (the forward runs without
    a transformers cache) go through `group_query_attention` with the layer's past from `shared_kv`.
    Returns [B, S, heads, D] like the eager implementation. Masks other than causal are refused."""
    if sliding_window is not None or softcap is not None or kwargs.get("s_aux") is not None:
        raise ValueError("ONNX export: sliding-window, soft-capped or sink attention is not supported")
    rows, num_heads, length, head_dim = query.shape
    kv_num_heads = key.shape[1]
    layer = module.layer_idx
    lengths = shared_kv.lengths.to(torch.int32)

    def packed(states: torch.Tensor) -> torch.Tensor:
        return states.transpose(1, 2).reshape(rows, length, -1)

    output, present_key, present_value = group_query_attention(
        packed(query), packed(key), packed(value), shared_kv.past[2 * layer], shared_kv.past[2 * layer + 1],
        lengths - 1, lengths.max(), num_heads, kv_num_heads, scaling if scaling is not None else head_dim**-0.5,
    )  # fmt: skip
    shared_kv.present += [present_key, present_value]
    return output.view(rows, length, num_heads, head_dim), None


@contextmanager
def attention_of(decoder: torch.nn.Module) -> Iterator[None]:
    """Run `decoder` with `shared_kv_attention` (registered as transformers' `ATTENTION`, with a
    mask function that gives no mask: the op masks causally itself) inside the block."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, shared_kv_attention)
    AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)
    previous = decoder.config._attn_implementation
    decoder.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        decoder.set_attn_implementation(previous)
