"""Captioning in the browser (onnxruntime-web in headless Chromium) against Python ONNX Runtime,
measured side by side in one run, and the size of the web exports.

A full-size model with random weights (CLIP ViT-B/32 + MLP mapper (K=10) + GPT-2 124M; speed does
not depend on weight values) is exported with `prefixcap export onnx` (float32, int8, int4) and
`prefixcap export web`. Both runtimes run the same graphs and caption the same JPEG files one at a
time, as the page does, greedy, exactly --new-tokens tokens each (min_new_tokens = max_new_tokens),
image decoding and preprocessing included:

- Chromium, WASM on 1 thread and on all cores (the page cross-origin isolated), from the export
  folder served on loopback (`prefixcap.web.preview`);
- Python ONNX Runtime on 1 thread and on all cores (`OnnxCaptionModel`, the engine's search).

Reported: each export's size in MB (10^6 bytes; the folder: graphs, embeddings, tokenizer data and
onnxruntime-web) and per file, captions/s, the browser's share of Python's, and the issue's targets
for each quantized export (at most 200 MB; single-thread WASM at least 50% of single-thread Python
ONNX Runtime at the same precision).

    python benchmarks/bench_web.py                          # full size; exports are kept in --workdir
    python benchmarks/bench_web.py --tiny --images 2 --new-tokens 3      # checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from prefixcap.onnx.export import export_onnx
from prefixcap.onnx.runtime import OnnxCaptionModel, is_onnx_export
from prefixcap.testing import build_full_size_model, build_image_dependent_model
from prefixcap.web.export import export_web, is_web_export
from prefixcap.web.preview import serve_folder

PHOTOS = [path.read_bytes() for path in sorted((Path(__file__).parents[1] / "examples" / "images").glob("*.jpg"))]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
TARGET_MB, TARGET_WASM_SHARE = 200, 0.5

# In the page: caption the files one at a time with the page's own Captioner; seconds for all.
CAPTION_ALL = """async ([files, options]) => {
  const images = files.map(([name, data]) => new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name));
  await captioner.generate([images[0]], options);  // warm-up
  const start = performance.now();
  for (const image of images) await captioner.generate([image], options);
  return (performance.now() - start) / 1000;
}"""


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def folder_mb(directory: Path) -> float:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) / 1e6


def file_mb(directory: Path) -> dict[str, float]:
    """The export's files over 0.1 MB, by path, in MB."""
    sizes = {
        str(path.relative_to(directory)): path.stat().st_size / 1e6 for path in directory.rglob("*") if path.is_file()
    }
    return {name: round(size, 1) for name, size in sorted(sizes.items()) if size >= 0.1}


def exports(model: Path, workdir: Path, precision: str, ort_web: Path | None) -> tuple[Path, Path]:
    """(ONNX export, web export) of `model` at `precision`, made once per --workdir."""
    onnx_dir, web_dir = workdir / f"onnx-{precision}", workdir / f"web-{precision}"
    if not is_onnx_export(onnx_dir):
        print(f"exporting {precision} ONNX graphs ...", flush=True)
        export_onnx(model, onnx_dir, quantize=None if precision == "float32" else precision, overwrite=True)
    if not is_web_export(web_dir):
        export_web(onnx_dir, web_dir, ort_web_tarball=ort_web, overwrite=True)
    return onnx_dir, web_dir


def python_rate(onnx_dir: Path, files: list[bytes], threads: int, new_tokens: int) -> float:
    """Captions/s of Python ONNX Runtime on `threads` threads, one image file at a time."""
    torch.set_num_threads(threads)  # the engine's search runs in torch: the same threads
    model = OnnxCaptionModel.from_pretrained(onnx_dir, threads=threads)
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}

    def caption(data: bytes) -> None:
        model.generate(pixels=model.preprocessor.load_pixels(data).unsqueeze(0), **options)

    caption(files[0])  # warm-up
    start = time.perf_counter()
    for data in files:
        caption(data)
    return len(files) / (time.perf_counter() - start)


def browser_rates(web_dir: Path, files: list[bytes], thread_counts: list[int], new_tokens: int) -> dict[int, Any]:
    """Captions/s in headless Chromium on WASM, one page load per thread count, and the browser's version."""
    import base64

    from playwright.sync_api import sync_playwright

    encoded = [(f"photo{i}.jpg", base64.b64encode(data).decode()) for i, data in enumerate(files)]
    options = {"maxNewTokens": new_tokens, "minNewTokens": new_tokens, "numBeams": 1}
    rates: dict[int, Any] = {}
    with serve_folder(web_dir, isolated=True) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for threads in thread_counts:
                page = browser.new_page()
                page.goto(f"{url}?backend=wasm&threads={threads}")
                page.wait_for_selector("body[data-ready]", timeout=600_000)
                assert page.evaluate("captioner.info.threads") == threads
                rates[threads] = len(files) / page.evaluate(CAPTION_ALL, [encoded, options])
                page.close()
            rates["version"] = browser.version
        finally:
            browser.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", type=Path, help="where the model and its exports are kept (default: a temporary folder)"
    )
    parser.add_argument("--images", type=int, default=16, help="images captioned per measurement (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens per caption (default: 20)")
    parser.add_argument(
        "--precisions", default="int4,int8,float32", help="exports to measure: int4, int8, float32 (default: all three)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny test model instead of the full-size one (a quick check)"
    )
    parser.add_argument("--ort-web", type=Path, help="onnxruntime-web's npm tarball (default: npm pack)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-web-") as scratch:
        workdir = args.workdir or Path(scratch)
        cores = os.cpu_count() or 1
        thread_counts = sorted({1, cores})
        files = [PHOTOS[i % len(PHOTOS)] for i in range(args.images)]
        model = build_image_dependent_model(workdir / "tiny") if args.tiny else build_full_size_model(workdir)
        results: dict[str, Any] = {
            "machine": {"cpu": cpu_name(), "cores": cores},
            "new_tokens": args.new_tokens, "images": args.images, "tiny": args.tiny, "sizes_mb": {}, "file_sizes_mb": {},
            "captions_per_s": {},
        }  # fmt: skip
        for precision in args.precisions.split(","):
            onnx_dir, web_dir = exports(model, workdir, precision, args.ort_web)
            results["sizes_mb"][precision] = round(folder_mb(web_dir), 1)
            results["file_sizes_mb"][precision] = file_mb(web_dir)
            rates = {
                f"python ort, {t} thread(s)": python_rate(onnx_dir, files, t, args.new_tokens) for t in thread_counts
            }
            browser = browser_rates(web_dir, files, thread_counts, args.new_tokens)
            results["machine"]["chromium"] = browser.pop("version")
            rates |= {f"chromium wasm, {t} thread(s)": rate for t, rate in browser.items()}
            results["captions_per_s"][precision] = rates
            print(f"\n{precision}: web export {results['sizes_mb'][precision]} MB")
            for name, size in results["file_sizes_mb"][precision].items():
                print(f"  {name:36s} {size:8.1f} MB")
            for name, rate in rates.items():
                print(f"  {name:28s} {rate:8.2f} captions/s")
            for t in thread_counts:
                share = browser[t] / rates[f"python ort, {t} thread(s)"]
                print(f"  browser / python, {t} thread(s): {share:.2f}")

        results["targets"] = {}
        for precision in ("int4", "int8"):
            if precision not in results["captions_per_s"]:
                continue
            rates = results["captions_per_s"][precision]
            share = rates["chromium wasm, 1 thread(s)"] / rates["python ort, 1 thread(s)"]
            results["targets"] |= {
                f"{precision} export <= {TARGET_MB} MB": results["sizes_mb"][precision] <= TARGET_MB,
                f"single-thread WASM {precision} >= {TARGET_WASM_SHARE:.0%} of Python ORT {precision}": share
                >= TARGET_WASM_SHARE,
            }
        if results["targets"]:
            print(
                "\ntargets:",
                ", ".join(f"{name}: {'met' if met else 'MISSED'}" for name, met in results["targets"].items()),
            )
        print(f"\nmachine: {results['machine']}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
