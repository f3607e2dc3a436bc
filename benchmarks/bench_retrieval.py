"""Retrieval cost per image with a caption datastore, on this CPU:

  - for each index kind (flat: exact; ivf; hnsw), the build time of the index over N captions and
    the time `Datastore.search` takes per image, one image per call (captioning a single image),
    a batch of images per call (captioning a folder), and a batch with each image's own captions
    excluded (training);
  - the approximate kinds' recall@k against exact search;
  - optionally, how fast the text tower of CLIP ViT-B/32 embeds captions (`--encode`), which
    sets the rest of a store's build time: captions / rate;
  - optionally (`--caption N`), captions/s of a retrieval-augmented model (random weights; tiny
    shapes, or ClipCap's with `--full-size`) with and without retrieval from the store, in the
    same run: the search, the prompts and the longer decoder inputs are the difference.

The stored vectors are random unit vectors of CLIP's width: search cost does not depend on their
values. Recall does: random vectors have no clusters or neighbourhoods, the worst case for IVF
and HNSW, so the recall printed here is a floor; a real store reports its own when it is built.

    python benchmarks/bench_retrieval.py                                    # 1M captions, 512-d
    python benchmarks/bench_retrieval.py --captions 100000 --kinds flat,ivf --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prefixcap.retrieval.encoder import PROBE_IMAGES, PROBE_TEXTS, CaptionEncoder, EncoderRecord
from prefixcap.retrieval.index import INDEX_KINDS, IndexSettings, build_index, faiss_module, recall_against
from prefixcap.retrieval.store import Datastore

CAPTIONS_PER_IMAGE = 5  # COCO's


def unit_vectors(rng: np.random.Generator, count: int, dim: int, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, chunk):
        block = rng.standard_normal((min(chunk, count - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def in_memory_store(index, settings: IndexSettings, count: int, dim: int) -> Datastore:
    """A Datastore around `index`, with placeholder captions (5 per image) and encoder record."""
    groups = [
        (f"image{image}", [f"caption {row}" for row in range(start, min(start + CAPTIONS_PER_IMAGE, count))])
        for image, start in enumerate(range(0, count, CAPTIONS_PER_IMAGE))
    ]
    probe = np.eye(max(PROBE_IMAGES, len(PROBE_TEXTS)), dim, dtype=np.float32)
    record = EncoderRecord("random vectors", dim, (224, 224), probe[:PROBE_IMAGES], probe[: len(PROBE_TEXTS)])
    return Datastore(Path("(in memory)"), record, settings, index, groups)


def ms_per_image(store: Datastore, queries: np.ndarray, batch: int, k: int, exclude: bool) -> float:
    """Milliseconds per image of `store.search`, `batch` images per call, over all `queries`."""
    calls = [queries[start : start + batch] for start in range(0, len(queries), batch)]
    store.search(calls[0], k)  # warm-up
    start = time.perf_counter()
    for number, call in enumerate(calls):
        ids = [f"image{(number * batch + row) % store.num_images}" for row in range(len(call))] if exclude else None
        store.search(call, k, exclude=ids)
    return (time.perf_counter() - start) * 1000 / len(queries)


def encoding_rate(captions: int, batch_size: int) -> float:
    """Captions per second through CLIP ViT-B/32's text tower (random weights, 32-token captions)."""
    import transformers

    from prefixcap.testing import build_clip

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as workdir:
        encoder = CaptionEncoder.from_pretrained(build_clip(workdir, full_size=True), batch_size=batch_size)
        texts = [f"a photo number {i} of a dog running on a sandy beach." for i in range(captions)]
        encoder.embed(texts[:batch_size])  # warm-up
        start = time.perf_counter()
        encoder.embed(texts)
        return captions / (time.perf_counter() - start)


def caption_rates(store: Datastore, images: int, batch: int, k: int, *, full_size: bool) -> dict[str, float]:
    """Captions/s of one model, greedy, with and without retrieval from `store` (whose vectors are
    replaced by random ones of the model's CLIP width, and whose encoder record is that CLIP's)."""
    import dataclasses

    import transformers

    from prefixcap.captioner import Captioner
    from prefixcap.model.caption_model import CaptionModel
    from prefixcap.retrieval.inference import Retrieval
    from prefixcap.testing import build_components

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as workdir:
        clip, gpt2 = build_components(workdir, full_size=full_size)
        model = CaptionModel.from_components(clip, gpt2, prefix_length=10 if full_size else 4)
        model.config.retrieval_k, model.config.retrieval_template = k, "Similar images show {captions} This image shows"
        model.config.retrieval_prompt_tokens = 128 if full_size else 40
        record = CaptionEncoder.from_pretrained(clip, device="cpu").record()
    dim = record.embed_dim
    vectors = unit_vectors(np.random.default_rng(1), len(store), dim)
    index = build_index(vectors, store.settings)
    groups = [(image_id, captions) for image_id, captions in store.groups()]
    sized = Datastore(store.path, record, store.settings, index, groups)
    captioner = Captioner(model.eval(), batch_size=batch)
    size = model.preprocessor.output_size
    pixels = torch.randint(0, 256, (images, 3, *size), dtype=torch.uint8)
    rates = {}
    for name, retrieval in (("without", None), ("with", Retrieval.for_model(model, sized, k=k))):
        request = dataclasses.replace(captioner.request(max_new_tokens=20), retrieval=retrieval)
        captioner.caption_pixels(pixels[:batch], request=request)  # warm-up
        start = time.perf_counter()
        for first in range(0, images, batch):
            captioner.caption_pixels(pixels[first : first + batch], request=request)
        rates[f"captions_per_s_{name}_retrieval"] = images / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = os.cpu_count() or 1
    parser.add_argument("--captions", type=int, default=1_000_000, help="captions in the store (default: 1000000)")
    parser.add_argument("--dim", type=int, default=512, help="embedding width (default: 512, CLIP ViT-B/32's)")
    parser.add_argument("--kinds", default=",".join(INDEX_KINDS), help="index kinds (default: flat,ivf,hnsw)")
    parser.add_argument("--k", type=int, default=4, help="captions retrieved per image (default: 4, SmallCap's)")
    parser.add_argument("--queries", type=int, default=1024, help="images searched per measurement (default: 1024)")
    parser.add_argument("--batch", type=int, default=256, help="images per search call when batched (default: 256)")
    parser.add_argument("--threads", type=int, default=cores, help=f"FAISS threads (default: {cores}, all cores)")
    parser.add_argument(
        "--encode", type=int, default=0, metavar="N",
        help="also time the ViT-B/32 text tower on N captions (default: 0, skipped)",
    )  # fmt: skip
    parser.add_argument(
        "--caption", type=int, default=0, metavar="N",
        help="also caption N random images with and without retrieval from a flat store of --captions captions "
        "(default: 0, skipped)",
    )  # fmt: skip
    parser.add_argument("--full-size", action="store_true", help="--caption with ClipCap's shapes, not tiny ones")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    faiss = faiss_module()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    vectors = unit_vectors(rng, args.captions, args.dim)
    queries = unit_vectors(rng, args.queries, args.dim)
    results: dict = {
        "machine": platform.processor() or platform.machine(), "cores": cores, "threads": args.threads,
        "captions": args.captions, "dim": args.dim, "k": args.k, "queries": args.queries, "batch": args.batch,
        "kinds": {},
    }  # fmt: skip
    exact = None
    for kind in args.kinds.split(","):
        settings = IndexSettings(kind).resolved(args.captions)
        start = time.perf_counter()
        index = build_index(vectors, settings)
        build_s = time.perf_counter() - start
        store = in_memory_store(index, settings, args.captions, args.dim)
        measured = {
            "index": settings.describe(),
            "build_s": build_s,
            "ms_per_image_one_per_call": ms_per_image(store, queries[:64], 1, args.k, exclude=False),
            "ms_per_image_batched": ms_per_image(store, queries, args.batch, args.k, exclude=False),
            "ms_per_image_batched_excluding_own": ms_per_image(store, queries, args.batch, args.k, exclude=True),
        }
        if kind == "flat":
            exact = index
        else:
            if exact is None:
                exact = build_index(vectors, IndexSettings("flat"))
            measured["recall_at_k_random_vectors"] = recall_against(index, exact, queries, args.k)
        results["kinds"][kind] = measured
        del store, index
    if args.encode:
        results["text_tower_captions_per_s"] = encoding_rate(args.encode, batch_size=256)
    if args.caption:
        flat = IndexSettings("flat")
        store = in_memory_store(build_index(vectors[:1], flat), flat, args.captions, args.dim)
        results["captioning"] = caption_rates(
            store, args.caption, min(args.batch, args.caption), args.k, full_size=args.full_size
        )
    print(f"{args.captions} captions of {args.dim}-d, k={args.k}, {args.threads} threads on {results['machine']}")
    for kind, measured in results["kinds"].items():
        recall = measured.get("recall_at_k_random_vectors")
        print(
            f"{kind:5s} {measured['index']}: build {measured['build_s']:.1f} s; per image "
            f"{measured['ms_per_image_one_per_call']:.3f} ms one per call, "
            f"{measured['ms_per_image_batched']:.3f} ms in batches of {args.batch}, "
            f"{measured['ms_per_image_batched_excluding_own']:.3f} ms excluding own captions"
            + (f"; recall@{args.k} {recall:.3f} (random vectors: a floor)" if recall is not None else "")
        )
    if args.encode:
        print(f"CLIP ViT-B/32 text tower: {results['text_tower_captions_per_s']:.0f} captions/s")
    if args.caption:
        rates = results["captioning"]
        print(f"captioning ({'full-size' if args.full_size else 'tiny'} model, greedy, 20 tokens): "
              f"{rates['captions_per_s_without_retrieval']:.1f} captions/s without retrieval, "
              f"{rates['captions_per_s_with_retrieval']:.1f} with")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
