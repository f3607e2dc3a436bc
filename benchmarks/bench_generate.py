"""Captioning speed, measured side by side in one process on full-size random-weight models.

Models: CLIP ViT-B/32 image tower, ClipCap's MLP mapper (K=10), GPT-2 124M or, with --decoder, a
Llama-family decoder of a hub model's shapes (llama: Llama 3.2 1B, smollm2: SmolLM2 135M, qwen2:
Qwen2.5 0.5B, qwen3: Qwen3 0.6B; --decoder-layers cuts a big one short). Speed does not depend on
weight values. Every caption gets exactly 20 new tokens (min_new_tokens = max_new_tokens),
so all methods do the same work.

Decoding from image embeddings (the mapper included), greedy and beam 5:
  (a) ClipCap's loop: one image at a time, the whole sequence recomputed at every step;
  (b) Hugging Face `generate` with its KV cache, batched;
  (c) prefixcap's decoding engine, batched;
  on CPU also (d) the engine in bf16 and (e) the engine with int8 decoder weights (`--quantize int8`),
  with what the CPU supports for them (AMX, AVX512-BF16, VNNI), and (o, p) the model's ONNX exports
  (`prefixcap export onnx`, fp32 and --quantize int8) on ONNX Runtime, driven by the same engine searches.
End to end: from preprocessed pixels (encode, map, decode, detokenize), and from JPEG files on
disk (image decoding and preprocessing included) through the `caption` command's pipeline
(DataLoader worker processes) and through `Captioner.stream` (worker threads).

    python benchmarks/bench_generate.py                       # CPU: fp32 (+ bf16, int8), batch 64 / beam batch 16
    python benchmarks/bench_generate.py --device cuda --json out.json
    python benchmarks/bench_generate.py --device cpu --workdir ~/bench-cpu --onnx fp32,int8   # exports once, reuses
    python benchmarks/bench_generate.py --decoder smollm2 --batch-size 32 --beam-batch-size 32 --skip-reference
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import transformers
from PIL import Image

from prefixcap import engine
from prefixcap.captioner import Captioner
from prefixcap.engine import DecodeSpec
from prefixcap.engine.backends import choose_backend
from prefixcap.inputs.loader import chunked
from prefixcap.model.caption_model import CaptionModel
from prefixcap.onnx.runtime import OnnxCaptionModel, is_onnx_export
from prefixcap.options import GenerationOptions
from prefixcap.system.hardware import cpu_flags, quantize_int8
from prefixcap.testing import build_full_size_model

NEW_TOKENS = 20
PREFIX_LENGTH = 10
# --decoder: the hub model whose shapes `build_decoder(full_size=True)` takes
DECODER_SHAPES = {
    "gpt2": "GPT-2 124M", "llama": "Llama 3.2 1B", "smollm2": "SmolLM2 135M", "qwen2": "Qwen2.5 0.5B",
    "qwen3": "Qwen3 0.6B",
}  # fmt: skip


# ---------------------------------------------------------------------- the three decoders
@torch.no_grad()
def clipcap_greedy(model: CaptionModel, image_embeds: torch.Tensor) -> torch.Tensor:
    """(a) Modelled on ClipCap's `generate2`: per image, run GPT-2 on the whole embedding sequence,
    sort for its top-p filter (which cannot change the argmax that follows), take the argmax, append."""
    gpt, captions = model.decoder, []
    embedding = gpt.get_input_embeddings()
    for embeds in image_embeds:
        sequence, tokens = model.prefix_embeds(embeds[None]), []
        for _ in range(NEW_TOKENS):
            logits = gpt(inputs_embeds=sequence).logits[:, -1, :]
            sorted_logits, _ = logits.sort(descending=True)
            sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            token = logits.argmax(dim=-1)
            tokens.append(token.item())  # ClipCap checks the stop token on the host every step
            sequence = torch.cat([sequence, embedding(token)[:, None]], dim=1)
        captions.append(tokens)
    return torch.tensor(captions)


@torch.no_grad()
def clipcap_beam(model: CaptionModel, image_embeds: torch.Tensor, beams: int = 5) -> torch.Tensor:
    """(a) Modelled on ClipCap's `generate_beam`: per image, `beams` sequences recomputed in full
    at every step, ranked by summed log-prob divided by length."""
    gpt, captions = model.decoder, []
    embedding = gpt.get_input_embeddings()
    for embeds in image_embeds:
        sequence = model.prefix_embeds(embeds[None])
        scores, tokens = None, None
        for step in range(NEW_TOKENS):
            log_probs = gpt(inputs_embeds=sequence).logits[:, -1, :].float().log_softmax(dim=-1)
            if scores is None:  # first step: the top tokens of the single sequence
                scores, next_tokens = log_probs[0].topk(beams)
                tokens, sequence = next_tokens[:, None], sequence.expand(beams, -1, -1)
            else:
                averaged = (scores[:, None] + log_probs) / (step + 1)
                best, flat = averaged.view(-1).topk(beams)
                source, next_tokens = flat // log_probs.shape[1], flat % log_probs.shape[1]
                tokens = torch.cat([tokens[source], next_tokens[:, None]], dim=1)
                sequence, scores = sequence[source], best * (step + 1)
            sequence = torch.cat([sequence, embedding(next_tokens)[:, None]], dim=1)
        captions.append(tokens[0].tolist())
    return torch.tensor(captions)


@torch.no_grad()
def hf_generate(model: CaptionModel, image_embeds: torch.Tensor, beams: int) -> torch.Tensor:
    """(b) Hugging Face `generate` with KV cache, batched."""
    prefix = model.prefix_embeds(image_embeds)
    eos = model.tokenizer.eos_token_id
    return model.decoder.generate(
        inputs_embeds=prefix,
        attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device),
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False,
        eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip


@torch.no_grad()
def prefixcap_generate(
    model: CaptionModel, image_embeds: torch.Tensor, beams: int, *, compile_blocks: bool, cuda_graphs: bool = True
) -> torch.Tensor:
    """(c) prefixcap's decoding engine, batched."""
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams)
    eos = model.tokenizer.eos_token_id
    spec = DecodeSpec.of(options, eos_token_ids=[eos], pad_token_id=eos)
    return engine.generate(
        model.decoder, model.prefix_embeds(image_embeds), spec, cuda_graphs=cuda_graphs, compile_blocks=compile_blocks
    )


@torch.no_grad()
def onnx_generate(
    model: CaptionModel, exported: OnnxCaptionModel, image_embeds: torch.Tensor, beams: int
) -> torch.Tensor:
    """(o, p) an ONNX export on ONNX Runtime, from the same prefixes (the PyTorch mapper's), batched."""
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams)
    return exported.generate_from_prefix(model.prefix_embeds(image_embeds), options)


# ---------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(run: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> None:
    """One untimed batch (CUDA graphs are captured and kernels tuned on first use: a one-time
    cost, not throughput), which also checks that captions get exactly NEW_TOKENS tokens."""
    tokens = run(inputs)
    if tokens.shape[-1] != NEW_TOKENS:
        raise RuntimeError(f"expected {NEW_TOKENS} new tokens per caption, got {tokens.shape[-1]}")


def throughput(run: Callable[[torch.Tensor], object], inputs: torch.Tensor, batch_size: int) -> dict:
    """Items per second of `run` over `inputs`, in batches."""
    synchronize(inputs.device)
    start = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        run(inputs[i : i + batch_size])
    synchronize(inputs.device)
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "items": len(inputs),
        "seconds": round(seconds, 4),
        "per_s": len(inputs) / seconds,
    }


def report(label: str, result: dict, unit: str = "captions/s") -> None:
    print(
        f"  {label:<40} batch {result['batch_size']:>5}  items {result['items']:>6}  "
        f"{result['seconds']:>8.3f} s  {result['per_s']:>10.2f} {unit}",
        flush=True,
    )


def write_jpegs(directory: Path, count: int, distinct: int = 16) -> list[Path]:
    """`count` 640x480 JPEG files (a typical photo size) of random noise, which makes decoding no
    easier. Files cycle through `distinct` images: encoding is slow, decoding costs the same."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(min(count, distinct)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    paths = [directory / f"{i:05d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        path.write_bytes(encoded[i % len(encoded)])
    return paths


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line)
        cpu = next(names, cpu)
    return f"{cpu}, {torch.get_num_threads()} threads"


def cpu_model_name() -> str:
    """The CPU's model name ("model name" in /proc/cpuinfo), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_support() -> str:
    """One line for the results: the CPU model and its bf16/int8 matrix instructions."""
    flags = cpu_flags()
    names = {"amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8", "avx512_bf16": "AVX512-BF16", "avx512_vnni": "AVX512-VNNI"}
    found = [label for flag, label in names.items() if flag in flags] or ["none of AMX / AVX512-BF16 / VNNI"]
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model_name()}: {', '.join(found)} (PyTorch CPU kernels: {capability})"


# ---------------------------------------------------------------------- benchmarks
class Method(NamedTuple):
    label: str
    run: Callable[[torch.Tensor], torch.Tensor]  # image embeddings -> new tokens
    batch_size: int


def decoding(
    model: CaptionModel,
    args: argparse.Namespace,
    beams: int,
    batch_size: int,
    count: int,
    variants: dict[str, CaptionModel] | None = None,
    exports: dict[str, OnnxCaptionModel] | None = None,
) -> dict:
    """(a), (b), (c) and the engine on each of `variants` (d, e, ...: the same model in another
    precision) on the same image embeddings; returns their figures and ratios. The methods run in
    interleaved rounds and each keeps its best round, so that a burst of other load on the machine
    cannot decide a ratio."""
    device, dtype = model.device, model.decoder.dtype
    embeds = torch.randn(max(count, batch_size), 512, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    reference = clipcap_beam if beams > 1 else clipcap_greedy
    methods = {}
    if not args.skip_reference:
        methods["a"] = Method("(a) ClipCap loop, one image at a time", lambda x: reference(model, x), 1)
    if not args.skip_hf:
        methods["b"] = Method("(b) HF generate with KV cache", lambda x: hf_generate(model, x, beams), batch_size)
    methods["c"] = Method(
        "(c) prefixcap engine" + (", compiled blocks" if args.compile else ""),
        lambda x: prefixcap_generate(model, x, beams, compile_blocks=args.compile),
        batch_size,
    )
    for key, (name, variant) in zip("defgh", (variants or {}).items()):
        methods[key] = Method(
            f"({key}) prefixcap engine, {name}",
            lambda x, variant=variant: prefixcap_generate(variant, x, beams, compile_blocks=args.compile),
            batch_size,
        )
    for key, (name, exported) in zip("opq", (exports or {}).items()):
        methods[key] = Method(
            f"({key}) ONNX Runtime, {name}",
            lambda x, exported=exported: onnx_generate(model, exported, x, beams),
            batch_size,
        )
    inputs = {key: embeds[: args.reference_images] if key == "a" else embeds for key in methods}
    for key, method in methods.items():
        warm_up(method.run, inputs[key][: method.batch_size])
    measured: dict = {}
    for _ in range(args.repeats):
        for key, method in methods.items():
            result = throughput(method.run, inputs[key], method.batch_size)
            if key not in measured or result["per_s"] > measured[key]["per_s"]:
                measured[key] = result
    for key, method in methods.items():
        report(method.label, measured[key])
    for key in [key for key in methods if key >= "c"]:
        for baseline in ("a", "b"):
            if baseline in measured:
                measured[f"{key}/{baseline}"] = measured[key]["per_s"] / measured[baseline]["per_s"]
    print("  " + "   ".join(f"{key} = {value:.2f}x" for key, value in measured.items() if "/" in key), flush=True)
    if args.profile:
        profile_engine(model, embeds[:batch_size], beams, args.compile)
    return measured


def profile_engine(model: CaptionModel, embeds: torch.Tensor, beams: int, compile_blocks: bool) -> None:
    """Print the GPU kernels of one (c) batch by total time. It runs without CUDA graphs so that
    every kernel is attributed; the graphs replay the same kernels."""
    from torch.profiler import ProfilerActivity, profile

    def run() -> None:
        prefixcap_generate(model, embeds, beams, compile_blocks=compile_blocks, cuda_graphs=False)
        synchronize(embeds.device)

    run()
    activities = [ProfilerActivity.CUDA] if embeds.device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        run()
    sort_by = "cuda_time_total" if embeds.device.type == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=70), flush=True)


def end_to_end(model: CaptionModel, args: argparse.Namespace, batch_size: int, count: int, workdir: Path) -> dict:
    """Greedy captions as text from preprocessed pixels, then from JPEG files on disk."""
    options = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    captioner = Captioner(model, batch_size=batch_size)
    size = model.image_processor.crop_size["height"]
    shape = (max(count, batch_size), 3, size, size)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pixels = pixels.to(model.device)
    captioner.caption_pixels(pixels[:batch_size], **options)  # warm-up
    measured = {"pixels": throughput(lambda x: captioner.caption_pixels(x, **options), pixels, batch_size)}
    report("from preprocessed pixels", measured["pixels"], "images/s")

    paths = write_jpegs(workdir, count)
    list(captioner.stream(paths[:batch_size], workers=args.workers, **options))  # warm-up
    units = list(chunked(paths, batch_size))

    def command_pipeline() -> int:
        results = captioner.caption_units(units, batch_size=batch_size, workers=args.workers, **options)
        return sum(len(unit_results) for _, unit_results in results)

    def stream() -> int:
        return sum(1 for _ in captioner.stream(paths, workers=args.workers, **options))

    for name, run, workers in [("jpeg", command_pipeline, "processes"), ("jpeg_stream", stream, "threads")]:
        start = time.perf_counter()
        captioned = run()
        seconds = time.perf_counter() - start
        measured[name] = {"batch_size": batch_size, "items": captioned, "seconds": round(seconds, 4),
                          "per_s": captioned / seconds}  # fmt: skip
        how = "caption command" if name == "jpeg" else "Captioner.stream"
        report(f"from JPEG, {how} ({args.workers} {workers})", measured[name], "images/s")
    return measured


def cpu_variants(model_dir: Path, names: str) -> dict[str, CaptionModel]:
    """CPU copies of the model for (d), (e): "bf16" in bfloat16, "int8" with dynamic int8 decoder weights."""
    variants = {}
    for name in [name.strip() for name in names.split(",") if name.strip()]:
        if name not in ("bf16", "int8"):
            raise SystemExit(f"error: unknown CPU variant {name!r} (choose bf16, int8)")
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        variant = CaptionModel.from_pretrained(model_dir, device="cpu", dtype=dtype).eval()
        if name == "int8":
            quantize_int8(variant.decoder)
        variants[name] = variant
    return variants


def onnx_exports(model_dir: Path, names: str) -> dict[str, OnnxCaptionModel]:
    """(o, p): the model exported with `prefixcap export onnx` ("fp32", "int8": --quantize int8) beside
    `model_dir`, reused when already there, loaded for ONNX Runtime."""
    from prefixcap.onnx.export import export_onnx

    exports = {}
    for name in [name.strip() for name in names.split(",") if name.strip()]:
        if name not in ("fp32", "int8"):
            raise SystemExit(f"error: unknown ONNX variant {name!r} (choose fp32, int8)")
        directory = model_dir.with_name(f"{model_dir.name}-onnx-{name}")
        if not is_onnx_export(directory):
            print(f"exporting the model to ONNX ({name}) ...", flush=True)
            export_onnx(model_dir, directory, quantize=None if name == "fp32" else name)
        exports[name] = OnnxCaptionModel.from_pretrained(directory)
    return exports


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    add(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    add("--batch-size", type=int, help="greedy batch size (default: 1024 on cuda, 64 on cpu)")
    add("--beam-batch-size", type=int, help="beam-5 batch size in images (default: 128 on cuda, 16 on cpu)")
    add("--num-images", type=int, help="images per greedy measurement (default: 4 batches on cuda, 1 on cpu)")
    add("--beam-images", type=int, help="images per beam-5 measurement (default: 4 batches on cuda, 1 on cpu)")
    add("--reference-images", type=int, help="images for ClipCap's slow loop (default: 8 on cuda, 2 on cpu)")
    add("--modes", default="greedy,beam", help="comma-separated, from: greedy, beam (default: both)")
    add("--repeats", type=int, default=3, help="interleaved timing rounds; each method keeps its best (default: 3)")
    add("--skip-reference", action="store_true", help="skip (a), ClipCap's loop")
    add("--skip-hf", action="store_true", help="skip (b), HF generate")
    add(
        "--cpu-variants",
        default="bf16,int8",
        help="on CPU, also time the engine on these copies of the model: comma-separated from bf16, int8 "
        "(dynamic int8 decoder weights); empty for none (default: bf16,int8)",
    )
    add(
        "--onnx",
        default="fp32,int8",
        help="on CPU, also time the model's ONNX exports on ONNX Runtime (needs prefixcap[onnx]): comma-separated "
        "from fp32, int8 (--quantize int8); empty for none (default: fp32,int8)",
    )
    add("--e2e-images", type=int, help="images for the end-to-end figures (default: as --num-images; 0 skips them)")
    add(
        "--workers",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="image decoding processes or threads (default: cores, at most 16)",
    )
    add("--workdir", type=Path, help="keep the built full-size model here and reuse it (default: a temp dir)")
    add(
        "--decoder",
        choices=list(DECODER_SHAPES),
        default="gpt2",
        help="decoder architecture at a hub model's shapes, random weights: gpt2 (GPT-2 124M), llama (Llama 3.2 "
        "1B), smollm2 (SmolLM2 135M), qwen2 (Qwen2.5 0.5B), qwen3 (Qwen3 0.6B) (default: gpt2)",
    )
    add(
        "--decoder-layers",
        type=int,
        help="build the Llama-family decoder with this many layers instead of the model's own (quicker runs "
        "of the 1B llama; the figures then stand for that depth)",
    )
    add(
        "--compile",
        action="store_true",
        help="run (c) with compile_blocks=True: torch.compile fuses the blocks' elementwise work",
    )
    add("--profile", action="store_true", help="also print where one (c) batch spends its time (torch.profiler)")
    add("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    batches = 4 if cuda else 1
    batch_size = args.batch_size or (1024 if cuda else 64)
    beam_batch_size = args.beam_batch_size or (128 if cuda else 16)
    args.reference_images = args.reference_images or (8 if cuda else 2)
    num_images = args.num_images or batches * batch_size
    e2e_images = num_images if args.e2e_images is None else args.e2e_images

    results: dict = {
        "device": str(device), "machine": machine_name(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__, "new_tokens": NEW_TOKENS,
        "prefix_length": PREFIX_LENGTH, "compile_blocks": args.compile,
    }  # fmt: skip
    print(" | ".join(f"{key} {results[key]}" for key in ("machine", "dtype", "torch", "transformers")))
    if not cuda:
        results["cpu_support"] = cpu_support()
        print(f"CPU support: {results['cpu_support']}")
    if args.decoder == "gpt2" and args.decoder_layers:
        raise SystemExit("error: --decoder-layers applies to Llama-family decoders")
    decoder_name = DECODER_SHAPES[args.decoder]
    if args.decoder_layers:
        decoder_name += f" cut to {args.decoder_layers} layers"
    print(f"CLIP ViT-B/32 + MLP mapper (K={PREFIX_LENGTH}) + {decoder_name}, random weights; {NEW_TOKENS} new tokens")
    results["decoder"] = decoder_name

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_full_size_model(args.workdir or tmp, args.decoder, decoder_layers=args.decoder_layers)
        model = CaptionModel.from_pretrained(model_dir, device=device, dtype=dtype).eval()
        results["decoding_path"] = choose_backend(model.decoder).description
        print(f"decoding path: {results['decoding_path']}", flush=True)
        variants = {} if cuda else cpu_variants(model_dir, args.cpu_variants)
        exports = {} if cuda else onnx_exports(model_dir, args.onnx)
        if exports:
            print(f"ONNX Runtime: {torch.get_num_threads()} intra-op threads (torch.get_num_threads())", flush=True)
        for mode in [mode.strip() for mode in args.modes.split(",") if mode.strip()]:
            if mode not in ("greedy", "beam"):
                raise SystemExit(f"error: unknown mode {mode!r} (choose greedy, beam)")
            print(f"\n{mode}" + (" (num_beams=5)" if mode == "beam" else ""), flush=True)
            if mode == "greedy":
                results["greedy"] = decoding(model, args, 1, batch_size, num_images, variants, exports)
            else:
                results["beam5"] = decoding(
                    model, args, 5, beam_batch_size, args.beam_images or batches * beam_batch_size, variants, exports
                )
        if e2e_images:
            print("\nend to end, greedy, text out", flush=True)
            results["end_to_end"] = end_to_end(model, args, batch_size, e2e_images, Path(tmp))
            for name, exported in exports.items():  # the same pipeline on an export (Captioner takes either)
                print(f"\nend to end, greedy, text out: ONNX Runtime, {name}", flush=True)
                results[f"end_to_end_onnx_{name}"] = end_to_end(exported, args, batch_size, e2e_images, Path(tmp))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
