"""Serving throughput with dynamic batching on and off, measured side by side in one run.

A full-size model with random weights (CLIP ViT-B/32 + MLP mapper (K=10) + GPT-2 124M; speed does
not depend on weight values) is served by `prefixcap serve` in a child process on loopback, twice:
with `--max-batch-size 16` and with `--max-batch-size 1` (no batching). Both servers run at once
and are measured in alternating rounds, so that both see the same noise from other processes on a
shared machine. In each round 16 concurrent clients send a fixed number of single-image multipart
requests (greedy, max_new_tokens 20). Reported: throughput, p50 / p99 latency, and the ratio.

The server gets one torch thread by default (--threads): on a shared CPU, torch's thread pool
waits on descheduled threads at every operation, which would swamp the effect being measured.
The batching window is 100 ms (--max-wait-ms): a CPU batch takes seconds, so the wait costs
little, and it lets the clients whose answers just went out rejoin the next batch. With the
server's default of 10 ms, 16 closed-loop clients settle into two alternating batches of 8.

    python benchmarks/bench_serve.py                      # CPU, ~3 minutes on 2 cores
    python benchmarks/bench_serve.py --requests 256 --threads 8 --workdir /tmp/bench-model
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers
from prometheus_client.parser import text_string_to_metric_families

from prefixcap.testing import build_full_size_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the tests' server launcher
from tests.helpers_serve_process import serve_in_subprocess  # noqa: E402

PHOTOS = [path.read_bytes() for path in sorted((Path(__file__).parents[1] / "examples" / "images").glob("*.jpg"))]
PREFIX_LENGTH = 10


async def measure(url: str, requests: int, args: argparse.Namespace) -> dict[str, Any]:
    """`requests` requests from args.clients concurrent clients: latencies, seconds, model batches."""
    pending = iter(range(requests))
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        for index in pending:  # clients share one iterator: each request is sent exactly once
            start = time.perf_counter()
            (await caption(http, index, args)).raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=args.clients)) as http:
        batches_before = await batch_count(http)
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
        seconds = time.perf_counter() - start
        batches = await batch_count(http) - batches_before
    return {"latencies": latencies, "seconds": seconds, "batches": batches}


async def warm_up(url: str, args: argparse.Namespace) -> None:
    """First-call allocations and lazy initialisation stay out of the measurement."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for index in range(2):
            (await caption(http, index, args)).raise_for_status()


async def caption(http: httpx.AsyncClient, index: int, args: argparse.Namespace) -> httpx.Response:
    photo = PHOTOS[index % len(PHOTOS)]
    return await http.post(
        "/v1/caption", files={"images": ("photo.jpg", photo)}, data={"max_new_tokens": str(args.max_new_tokens)}
    )


async def batch_count(http: httpx.AsyncClient) -> float:
    """Model batches run so far, from the server's Prometheus metrics."""
    for family in text_string_to_metric_families((await http.get("/metrics")).text):
        for sample in family.samples:
            if sample.name == "prefixcap_batch_size_count":
                return sample.value
    raise RuntimeError("no prefixcap_batch_size_count in /metrics")


def summarize(rounds: list[dict[str, Any]]) -> dict[str, float]:
    latencies = sorted(latency for r in rounds for latency in r["latencies"])
    seconds = sum(r["seconds"] for r in rounds)
    return {
        "throughput": len(latencies) / seconds,
        "p50": statistics.median(latencies),
        "p99": latencies[round(0.99 * (len(latencies) - 1))],
        "images_per_batch": len(latencies) / sum(r["batches"] for r in rounds),
        "seconds": seconds,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per configuration, all rounds (default: 64)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds (default: 2)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="batch bound with batching on (default: 16)")
    parser.add_argument("--max-wait-ms", type=float, default=100.0, help="batching window (default: 100)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="caption length bound (default: 20)")
    parser.add_argument("--device", default="cpu", help="torch device for the servers (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="each server's torch intra-op threads (default: 1)")
    parser.add_argument("--workdir", type=Path, help="keep the built model here and reuse it (default: a temp dir)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    transformers.utils.logging.set_verbosity_error()  # the unused CLIP text tower is reported at load
    transformers.utils.logging.disable_progress_bar()
    print(
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), torch {torch.__version__}, "
        f"servers on {args.device} with {args.threads} thread(s); "
        f"CLIP ViT-B/32 + MLP (K={PREFIX_LENGTH}) + GPT-2 124M, random weights; {args.clients} clients, "
        f"{args.requests} requests in {args.rounds} rounds, 1 image each, greedy, max_new_tokens {args.max_new_tokens}",
        flush=True,
    )
    configurations = {
        f"batching on (--max-batch-size {args.max_batch_size})": args.max_batch_size,
        "batching off (--max-batch-size 1)": 1,
    }
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        model_dir = build_full_size_model(args.workdir or tmp)
        urls = {}
        for name, batch_size in configurations.items():
            serve_args = [
                "--device",
                args.device,
                "--max-batch-size",
                str(batch_size),
                "--max-wait-ms",
                str(args.max_wait_ms),
            ]
            server = serve_in_subprocess(
                model_dir, *serve_args, "--log-level", "warning", log_path=Path(tmp) / f"serve-{batch_size}.log",
                env={"OMP_NUM_THREADS": str(args.threads)},
            )  # fmt: skip
            urls[name] = servers.enter_context(server)[1]
            asyncio.run(warm_up(urls[name], args))
        rounds: dict[str, list] = {name: [] for name in urls}
        for _ in range(args.rounds):  # alternate configurations, so both meet the same background load
            for name, url in urls.items():
                rounds[name].append(asyncio.run(measure(url, args.requests // args.rounds, args)))
    results = {name: summarize(measured) for name, measured in rounds.items()}
    for name, result in results.items():
        print(
            f"{name:<36} {result['throughput']:6.2f} req/s   p50 {result['p50']:6.2f} s   p99 {result['p99']:6.2f} s   "
            f"{result['images_per_batch']:5.1f} images/batch   ({result['seconds']:.1f} s measured)"
        )
    on, off = results.values()
    print(f"throughput ratio, batching on / off: {on['throughput'] / off['throughput']:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
