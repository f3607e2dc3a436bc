"""The matrix products under a caption, alone: onnxruntime-web's WASM kernels against Python ONNX
Runtime's, one thread each, side by side in one run.

A graph of 12 blocks of two MatMuls (768 -> 3072 -> 768, GPT-2's MLP: 57M weights) is saved in
float32, int8 (`quantize_dynamic`, per channel, as `export onnx --quantize int8`) and int4
(`MatMulNBits`, blocks of 32, as `--quantize int4`), and run on M = 1 row (a decoding step: a
matrix-vector product) and M = 50 rows (ViT-B/32's 50 tokens: the encoder). It shows what bounds the
browser's captions/s in bench_web.py: whether int8 or int4 weights make WASM's products faster, as
they make the native ones.

    python benchmarks/bench_web_kernels.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from prefixcap.web import ort_web
from prefixcap.web.preview import serve_folder

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: bench_web's browser settings
from bench_web import CHROMIUM, CHROMIUM_ARGS, cpu_name  # noqa: E402

HIDDEN, INNER, BLOCKS, ROWS = 768, 3072, 12, (1, 50)

# In the page: each graph's milliseconds per run, on WASM with one thread.
TIME_GRAPHS = """async ([names, rows, repeats]) => {
  const ort = await import("./ort/ort.wasm.min.mjs");
  ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
  ort.env.wasm.numThreads = 1;
  const out = {};
  for (const name of names) {
    const bytes = new Uint8Array(await (await fetch(`${name}.onnx`)).arrayBuffer());
    const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    for (const m of rows) {
      const x = { x: new ort.Tensor("float32", new Float32Array(m * 768).fill(0.3), [m, 768]) };
      await session.run(x);
      const start = performance.now();
      for (let i = 0; i < repeats; i++) await session.run(x);
      out[`${name}, M=${m}`] = (performance.now() - start) / repeats;
    }
    await session.release();
  }
  return out;
}"""


def write_graphs(folder: Path) -> list[str]:
    """float32.onnx, int8.onnx and int4.onnx in `folder`; returns their names."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for block in range(BLOCKS):
        for index, shape in enumerate([(HIDDEN, INNER), (INNER, HIDDEN)]):
            name = f"w{block}.{index}"
            weights.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), name))
            nodes.append(helper.make_node("MatMul", [x, name], [f"y{block}.{index}"]))
            x = f"y{block}.{index}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", HIDDEN])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["m", HIDDEN])], weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, folder / "float32.onnx")
    quantize_dynamic(folder / "float32.onnx", folder / "int8.onnx", weight_type=QuantType.QInt8, per_channel=True)
    quantizer = MatMulNBitsQuantizer(onnx.load(folder / "float32.onnx"), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(folder / "int4.onnx"))
    return ["float32", "int8", "int4"]


def python_ms(folder: Path, names: list[str], repeats: int) -> dict[str, float]:
    """Each graph's milliseconds per run in Python ONNX Runtime on one thread."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    out = {}
    for name in names:
        session = onnxruntime.InferenceSession(
            str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"]
        )
        for m in ROWS:
            feeds = {"x": np.full((m, HIDDEN), 0.3, np.float32)}
            session.run(None, feeds)
            start = time.perf_counter()
            for _ in range(repeats):
                session.run(None, feeds)
            out[f"{name}, M={m}"] = (time.perf_counter() - start) / repeats * 1000
    return out


def wasm_ms(folder: Path, names: list[str], repeats: int, ort_web_tarball: Path | None) -> tuple[dict[str, float], str]:
    """Each graph's milliseconds per run in headless Chromium, WASM on one thread; and Chromium's version."""
    from playwright.sync_api import sync_playwright

    ort_web.install(folder / "ort", ["wasm"], ort_web_tarball)
    (folder / "index.html").write_text("<!doctype html><title>kernels</title>")
    with serve_folder(folder, isolated=True) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            return page.evaluate(TIME_GRAPHS, [names, list(ROWS), repeats]), browser.version
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs timed per graph and M (default: 5)")
    parser.add_argument("--ort-web", type=Path, help="onnxruntime-web's npm tarball (default: npm pack)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-web-kernels-") as scratch:
        folder = Path(scratch)
        names = write_graphs(folder)
        python = python_ms(folder, names, args.repeats)
        wasm, chromium = wasm_ms(folder, names, args.repeats, args.ort_web)
    print(f"{BLOCKS} x (MatMul {HIDDEN}x{INNER} + {INNER}x{HIDDEN}), ms per run, one thread")
    print(f"{'graph':16s} {'Python ORT':>11s} {'WASM':>9s} {'WASM / Python time':>19s}")
    for key in python:
        print(f"{key:16s} {python[key]:11.1f} {wasm[key]:9.1f} {wasm[key] / python[key]:19.1f}")
    machine = {
        "cpu": cpu_name(),
        "chromium": chromium,
        "onnxruntime": onnxruntime.__version__,
        "ort_web": ort_web.VERSION,
    }
    print(f"machine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"python_ms": python, "wasm_ms": wasm, "machine": machine}, indent=2) + "\n")


if __name__ == "__main__":
    main()
