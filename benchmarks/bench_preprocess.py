"""Image preprocessing throughput, side by side in one process:

  (a) the Hugging Face processor per image (CLIPImageProcessorPil: resize, crop, rescale and
      normalise on the CPU, float32 out), as prefixcap did before;
  (b) prefixcap's `ImagePreprocessor.pixels` (resize and crop in PIL, uint8 out; the rescale and
      normalisation run later, batched, on the model's device).

Both decode the same 640x480 JPEG files from disk (`load_image`), in 1..N worker threads, and
print images/s and the ratio b/a per thread count.

    python benchmarks/bench_preprocess.py                # threads 1 and all cores
    python benchmarks/bench_preprocess.py --threads 1,2,4,8,16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from prefixcap.images import load_image
from prefixcap.preprocess import ImagePreprocessor


def write_jpegs(directory: Path, count: int) -> list[Path]:
    """`count` 640x480 photo-like JPEGs (smooth gradients plus noise, quality 90)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(count):
        base = np.stack([x * (i + 1) % 256, y * 2 % 256, (x + y) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = directory / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(work: Callable[[Path], object], paths: list[Path], threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, paths[: threads * 2]))  # warm-up
        start = time.perf_counter()
        list(pool.map(work, paths))
        return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = os.cpu_count() or 1
    parser.add_argument("--threads", default=f"1,{cores}", help=f"comma-separated thread counts (default: 1,{cores})")
    parser.add_argument("--images", type=int, default=400, help="JPEG files per measurement (default: 400)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    processor = CLIPImageProcessorPil()  # CLIP ViT-B/32's settings
    preprocessor = ImagePreprocessor(processor)
    methods = {
        "a_hf_processor": lambda path: processor(load_image(path), return_tensors="pt").pixel_values[0],
        "b_prefixcap_uint8": lambda path: preprocessor.pixels(load_image(path)),
    }
    thread_counts = [int(n) for n in args.threads.split(",")]
    results: dict = {"machine": platform.processor() or platform.machine(), "cores": cores, "images": args.images}
    with tempfile.TemporaryDirectory() as workdir:
        files = write_jpegs(Path(workdir), 32)
        paths = [files[i % len(files)] for i in range(args.images)]
        for name, work in methods.items():
            results[name] = {n: images_per_second(work, paths, n) for n in thread_counts}
    print(f"{cores} cores, {args.images} 640x480 JPEGs from disk, CLIP ViT-B/32 preprocessing")
    for name in methods:
        print(f"{name:18s} " + "  ".join(f"{n:3d} threads {rate:8.1f} images/s" for n, rate in results[name].items()))
    for n in thread_counts:
        print(f"b/a at {n} threads: {results['b_prefixcap_uint8'][n] / results['a_hf_processor'][n]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
