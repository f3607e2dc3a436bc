"""Sharded captioning with 1 and with 2 processes, side by side, on a full-size random model.

Model: CLIP ViT-B/32 image tower, ClipCap's MLP mapper (K=10), GPT-2 124M (random weights; speed
does not depend on them). Every caption gets exactly 20 new tokens. Images: synthetic 640x480
JPEGs, decoded by the DataLoader workers like real ones.

Every run goes through the real command line, into a fresh output folder:
  1 process x 1 thread     OMP_NUM_THREADS=1         python -m prefixcap caption ... --output out/
  1 process x all cores    OMP_NUM_THREADS=<cpus>    python -m prefixcap caption ... --output out/
  N processes              OMP_NUM_THREADS=<cpus/N>  accelerate launch --multi_gpu --num_processes N -m prefixcap ...
(`--multi_gpu` makes accelerate start N processes through torchrun; on a machine without a GPU
they run on CPU cores with the gloo backend.) The figure compared is `images_per_second` from
summary.json: captioning only, from the common start after model loading to the last process's
end. Wall time, launch and model loading included, is printed too. The single-thread run tells
apart what processes add from what threads inside one process fail to add.

It also measures how many images one CPU core decodes and preprocesses per second (what one
DataLoader worker delivers), which sets how many workers a fast GPU needs.

With --ray, the same images and model go through the in-process path and the Ray path instead:
  in-process               OMP_NUM_THREADS=<cpus>    python -m prefixcap caption ... --output out/
  Ray, N actors            OMP_NUM_THREADS=<cpus/N>  python -m prefixcap caption ... --ray --ray-actors N --output out/
(a cluster of this machine started for the job on 127.0.0.1; each actor reserves cpus/N CPUs and
decodes its own images, as Ray runs decoding inside CPU actors). The figure compared is images per
second of wall time, from the command's start to its exit: a Ray job's time includes starting the
cluster and its actors, which a local job's captioning rate (summary.json) leaves out; both are
printed, and their ratio, Ray / in-process. Use enough images that start-up does not dominate.

    python benchmarks/bench_scaling.py                 # 32 images, 1 vs 2 processes
    python benchmarks/bench_scaling.py --images 128 --processes 4 --repeats 2
    python benchmarks/bench_scaling.py --ray --images 256 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prefixcap.testing import build_full_size_model

NEW_TOKENS = 20


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random gradients with noise: about as compressible, and as slow to decode, as photos."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:480, 0:640] / 640.0
    for i in range(count):
        a, b, c = rng.uniform(0.2, 1.0, size=(3, 3))
        rgb = np.stack([np.sin(a[k] * 9 * x + b[k] * 7 * y + c[k] * 6) for k in range(3)], axis=-1)
        pixels = (rgb * 90 + 128 + rng.normal(0, 12, rgb.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def preprocessing_rate(model: Path, images: Path) -> float:
    """Images/s that one core decodes (JPEG) and preprocesses (resize, crop; normalising happens
    later, batched on the model's device) in one thread."""
    from prefixcap.inputs.loader import ImageLoader
    from prefixcap.inputs.preprocess import ImagePreprocessor
    from prefixcap.model.encoders import load_image_processor

    torch.set_num_threads(1)
    loader = ImageLoader(ImagePreprocessor(load_image_processor(model / "image_processor")))
    batches = loader.batches([sorted(images.glob("*.jpg"))], batch_size=16, workers=0)  # in this thread
    start = time.perf_counter()
    count = sum(len(batch.keys) for batch in batches)
    return count / (time.perf_counter() - start)


def run_job(
    model: Path, images: Path, out: Path, *, processes: int, threads: int, args: argparse.Namespace, ray: bool = False
) -> dict:
    """One captioning job (`ray`: on a local Ray cluster, `processes` actors); returns its
    summary.json plus the wall time."""
    caption = [
        "-m", "prefixcap", "caption", str(images), "--model", str(model), "--output", f"{out}/",
        "--max-new-tokens", str(NEW_TOKENS), "--min-new-tokens", str(NEW_TOKENS),
        "--batch-size", str(args.batch_size), "--part-size", str(args.part_size), "--workers", str(args.workers),
    ]  # fmt: skip
    if ray:
        command = [sys.executable, *caption, "--ray", "--ray-actors", str(processes), "--ray-cpus", str(threads)]
    elif processes == 1:
        command = [sys.executable, *caption]
    else:
        launcher = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
        launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, *caption]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"the {'Ray' if ray else f'{processes}-process'} job failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "wall_seconds": wall}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="number of JPEGs (default: 32)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel run (default: 2)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPU cores to share out (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model batch (default: 8)")
    parser.add_argument("--part-size", type=int, default=8, help="images per part (default: 8)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per process (default: 1)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times (default: 1)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--ray", action="store_true", help="compare the in-process path with the Ray path (--processes actors)"
    )
    args = parser.parse_args()
    if args.ray:
        compare_ray(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        workdir = Path(tmp)
        print(f"building a full-size random model and {args.images} JPEGs in {workdir} ...", file=sys.stderr)
        model = build_full_size_model(workdir)
        make_images(workdir / "images", args.images)
        decode_rate = preprocessing_rate(model, workdir / "images")
        # (processes, threads per process): the cores are shared out between the processes.
        configs = [(1, 1), (1, args.cpus), (args.processes, max(1, args.cpus // args.processes))]
        runs: dict[tuple[int, int], list[dict]] = {config: [] for config in configs}
        for repeat in range(args.repeats):
            for processes, threads in configs:  # alternated, so that changing load hits all alike
                out = workdir / f"out-{processes}x{threads}-{repeat}"
                run = run_job(model, workdir / "images", out, processes=processes, threads=threads, args=args)
                runs[processes, threads].append(run)
                print(
                    f"{processes} process(es) x {threads} thread(s): {run['images_per_second']:.2f} images/s "
                    f"captioning, {run['wall_seconds']:.1f} s wall",
                    file=sys.stderr,
                )

    best = {config: max(run["images_per_second"] for run in results) for config, results in runs.items()}
    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.images} images, batch {args.batch_size}")
    print(f"{'processes':>9} {'threads each':>12} {'images/s (best)':>15} {'all runs':>20} {'wall s':>8}")
    for (processes, threads), results in runs.items():
        rates = ", ".join(f"{run['images_per_second']:.2f}" for run in results)
        wall = min(run["wall_seconds"] for run in results)
        print(f"{processes:>9} {threads:>12} {best[processes, threads]:>15.2f} {rates:>20} {wall:>8.1f}")
    print(f"decoding + preprocessing 640x480 JPEGs: {decode_rate:.0f} images/s per core")
    parallel, threaded, single = best[configs[2]], best[configs[1]], best[configs[0]]
    print(f"{args.processes} processes vs 1 process with {args.cpus} threads: {parallel / threaded:.2f}x")
    print(f"{args.processes} processes vs 1 process with 1 thread: {parallel / single:.2f}x")
    if args.json:
        figures = {f"{p}x{t}": results for (p, t), results in runs.items()}
        report = {"runs": figures, "preprocessing_per_core": decode_rate, "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(report, indent=2))


def compare_ray(args: argparse.Namespace) -> None:
    """The in-process path (one process on all cores) against the Ray path (--processes actors
    sharing the cores), on the same images and model, alternated --repeats times."""
    threads = max(1, args.cpus // args.processes)
    runs: dict[str, list[dict]] = {"in-process": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        workdir = Path(tmp)
        print(f"building a full-size random model and {args.images} JPEGs in {workdir} ...", file=sys.stderr)
        model = build_full_size_model(workdir)
        make_images(workdir / "images", args.images)
        for repeat in range(args.repeats):
            for name in runs:
                out = workdir / f"out-{name}-{repeat}"
                if name == "ray":
                    run = run_job(model, workdir / "images", out, processes=args.processes, threads=threads,
                                  args=args, ray=True)  # fmt: skip
                else:
                    run = run_job(model, workdir / "images", out, processes=1, threads=args.cpus, args=args)
                run["wall_images_per_second"] = args.images / run["wall_seconds"]
                runs[name].append(run)
                print(
                    f"{name}: {run['wall_images_per_second']:.2f} images/s end to end ({run['wall_seconds']:.1f} s), "
                    f"summary.json: {run['images_per_second']:.2f} images/s",
                    file=sys.stderr,
                )
    best = {name: max(run["wall_images_per_second"] for run in results) for name, results in runs.items()}
    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.images} images, batch {args.batch_size}")
    print(f"in-process: 1 process x {args.cpus} threads; Ray: {args.processes} actors x {threads} CPUs (threads) each")
    print(f"{'path':>10} {'images/s end to end (best)':>26} {'all runs':>20} {'summary.json images/s':>22}")
    for name, results in runs.items():
        rates = ", ".join(f"{run['wall_images_per_second']:.2f}" for run in results)
        summary = ", ".join(f"{run['images_per_second']:.2f}" for run in results)
        print(f"{name:>10} {best[name]:>26.2f} {rates:>20} {summary:>22}")
    print(f"Ray / in-process, end to end: {best['ray'] / best['in-process']:.2f}x")
    if args.json:
        report = {
            "runs": runs,
            "ratio": best["ray"] / best["in-process"],
            "args": vars(args) | {"json": str(args.json)},
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
