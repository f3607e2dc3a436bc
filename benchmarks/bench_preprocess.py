"""Image preprocessing throughput, side by side in one process:

  (a) the Hugging Face processor per image (CLIPImageProcessorPil: resize, crop, rescale and
      normalise on the CPU, float32 out), as prefixcap did before;
  (b) prefixcap's `ImagePreprocessor.load_pixels` (resize and crop in PIL, uint8 out; the rescale
      and normalisation run later, batched, on the model's device), bit-equal to (a);
  (c) the same with `jpeg_draft=True` (`caption --jpeg-draft`): JPEGs decode at the smallest
      1/2, 1/4 or 1/8 scale that still covers the model's input.

All three read the same photo-like JPEG files from disk, in 1..N worker threads, and print
images/s and the ratios b/a and c/a per thread count.

    python benchmarks/bench_preprocess.py                   # 640x480, threads 1 and all cores
    python benchmarks/bench_preprocess.py --size 4000x3000 --threads 1,8,16 --json out.json
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

from prefixcap.inputs.images import load_image
from prefixcap.inputs.preprocess import ImagePreprocessor


def write_jpegs(directory: Path, count: int, width: int, height: int) -> list[Path]:
    """`count` photo-like JPEGs (smooth gradients plus noise, quality 90)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
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
    parser.add_argument("--size", default="640x480", help="JPEG width x height (default: 640x480, COCO's usual size)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.split("x"))
    torch.set_num_threads(1)
    processor = CLIPImageProcessorPil()  # CLIP ViT-B/32's settings
    preprocessor = ImagePreprocessor(processor)
    methods = {
        "a_hf_processor": lambda path: processor(load_image(path), return_tensors="pt").pixel_values[0],
        "b_prefixcap_uint8": lambda path: preprocessor.load_pixels(path),
        "c_prefixcap_jpeg_draft": lambda path: preprocessor.load_pixels(path, jpeg_draft=True),
    }
    thread_counts = [int(n) for n in args.threads.split(",")]
    results: dict = {"machine": platform.processor() or platform.machine(), "cores": cores, "images": args.images,
                      "size": args.size}  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        files = write_jpegs(Path(workdir), 16, width, height)
        paths = [files[i % len(files)] for i in range(args.images)]
        for name, work in methods.items():
            results[name] = {n: images_per_second(work, paths, n) for n in thread_counts}
    print(f"{cores} cores, {args.images} {args.size} JPEGs from disk, CLIP ViT-B/32 preprocessing")
    for name in methods:
        print(f"{name:22s} " + "  ".join(f"{n:3d} threads {rate:8.1f} images/s" for n, rate in results[name].items()))
    for n in thread_counts:
        baseline = results["a_hf_processor"][n]
        print(f"at {n} threads: b/a {results['b_prefixcap_uint8'][n] / baseline:.2f}x, "
              f"c/a {results['c_prefixcap_jpeg_draft'][n] / baseline:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
