"""Attention kernels at the decoding engine's shapes, side by side in one process.

The engine calls `F.scaled_dot_product_attention` twice per layer and step, on views of its KV
cache: a causal prefill of the K prefix positions, then one query against the filled part of the
cache per decode step. On an H100 the default dispatch (cuDNN) took a third of a greedy batch's
time, about twice what reading the cache costs. This measures every SDPA backend and a plain
matmul-softmax-matmul on exactly those views (GPT-2 124M: 12 heads of 64), each captured in a
CUDA graph as the engine replays it, and prints microseconds per call, the ratio to the default,
and the largest difference from a float32 reference.

    python benchmarks/bench_attention.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM = 12, 64
BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def sdpa(backend: SDPBackend | None) -> Attention:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with plain batched matmuls (softmax in float32)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        length = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1), -torch.inf)
    return torch.matmul(scores.float().softmax(dim=-1).to(v.dtype), v)


def engine_views(rows: int, queries: int, filled: int, length: int, dtype: torch.dtype, device: torch.device):
    """q, k, v laid out as the engine has them: q a permuted view of the fused qkv projection, k and
    v the filled part of a [2, rows, heads, length, head_dim] cache."""
    generator = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(rows * queries, 3 * HEADS * HEAD_DIM, generator=generator, device=device, dtype=dtype)
    q = qkv.view(rows, queries, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)[0]
    cache = torch.randn(2, rows, HEADS, length, HEAD_DIM, generator=generator, device=device, dtype=dtype)
    return q, cache[0, :, :, :filled], cache[1, :, :, :filled]


def microseconds_per_call(attend: Attention, views, causal: bool, device: torch.device, calls: int = 24) -> float:
    def run() -> None:
        for _ in range(calls):
            attend(*views, causal)

    run()  # warm-up (and kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / (5 * calls) * 1e6
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 on cuda")
    parser.add_argument("--rows", type=int, help="decoder rows: batch x beams (default: 1024 on cuda, 64 on cpu)")
    parser.add_argument("--prefix-length", type=int, default=10, help="K (default: 10)")
    parser.add_argument("--new-tokens", type=int, default=20, help="decode steps (default: 20)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = args.rows or (1024 if device.type == "cuda" else 64)
    length = args.prefix_length + args.new_tokens - 1
    shapes = {  # name: (queries, filled cache positions, causal)
        "prefill": (args.prefix_length, args.prefix_length, True),
        "decode, first step": (1, args.prefix_length + 1, False),
        "decode, last step": (1, length, False),
    }
    variants: dict[str, Attention] = {name: sdpa(backend) for name, backend in BACKENDS.items()}
    variants["matmul"] = matmul_attention
    print(f"{device} {dtype} | {rows} rows x {HEADS} heads x {HEAD_DIM} | cache length {length}")
    results: dict = {"device": str(device), "dtype": str(dtype), "rows": rows, "shapes": {}}
    for shape, (queries, filled, causal) in shapes.items():
        views = engine_views(rows, queries, filled, length, dtype, device)
        reference = matmul_attention(*(t.float() for t in views), causal)
        measured = {}
        for name, attend in variants.items():
            try:
                error = (attend(*views, causal).float() - reference).abs().max().item()
                measured[name] = {"us": microseconds_per_call(attend, views, causal, device), "max_abs_error": error}
            except RuntimeError as failure:  # a backend that does not take this shape or layout
                measured[name] = {"unsupported": str(failure).splitlines()[0][:100]}
        results["shapes"][shape] = measured
        print(f"\n{shape}: {queries} queries x {filled} keys{' (causal)' if causal else ''}")
        default = measured["default"].get("us")
        for name, m in measured.items():
            if "us" in m:
                ratio = f"{default / m['us']:5.2f}x the default's speed" if default else ""
                print(f"  {name:10s} {m['us']:9.1f} us/call  {ratio}  max |error| {m['max_abs_error']:.2e}")
            else:
                print(f"  {name:10s} unsupported: {m['unsupported']}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
