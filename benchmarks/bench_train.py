"""Training speed, measured side by side in one process: a ClipCap-style step against prefixcap's.

Model: GPT-2 124M plus ClipCap's MLP mapper (K=10), random weights (speed does not depend on
them); the image embeddings are random 512-d vectors, as a feature store provides them (the image
encoder is not part of a training step). Captions have 10-20 tokens, as in COCO.

  (a) ClipCap's train.py step: fp32, batch 40, AdamW with a per-parameter loop, every caption
      padded to the longest in the data set (20 tokens), no EOS;
  (b) prefixcap's step (`train_step` on a `CaptionLoss`, as `prefixcap train` runs it): its
      default precision (bf16 autocast on CUDA), fused AdamW on CUDA, batch 256, captions + EOS
      padded only to the longest in their batch, the LM head and loss computed only where there
      is a target, gradient clipping and LR schedule included.

  `--objective scst` times a self-critical step instead (`train --objective scst`): sampling
  `--samples-per-image` captions of up to 20 tokens per image with the decoding engine, the CIDEr-D
  reward, the mean-of-others baseline and the policy-gradient step, with `--batch-size` images; it
  reports sampled captions per second and the shares of the step spent sampling and rewarding. A
  random-weight model samples noise, so the reward scores COCO-like stand-ins (8-16 words of a
  Zipf-distributed 2,000-word vocabulary) against 5 such references per image, which cost CIDEr-D
  what real captions cost.

    python benchmarks/bench_train.py --steps 3 --batch-size 64    # CPU: a quick look
    python benchmarks/bench_train.py --objective scst --steps 2 --warmup 1 --batch-size 4    # CPU smoke
    python benchmarks/bench_train.py --device cuda --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers

from prefixcap.model.caption_model import CaptionModel
from prefixcap.testing import build_full_size_model
from prefixcap.training import TrainConfig
from prefixcap.training.data import CaptionTargets
from prefixcap.training.objective import CaptionLoss
from prefixcap.training.scst import SCSTLoss, SelfCritical
from prefixcap.training.trainer import (
    build_accelerator,
    build_optimizer,
    build_scheduler,
    default_precision,
    train_step,
)

PREFIX_LENGTH = 10
CAPTION_TOKENS = (10, 20)  # shortest and longest caption, in tokens
CLIPCAP_BATCH = 40


def random_targets(num_captions: int, seed: int = 0) -> CaptionTargets:
    """COCO-like captions of random token ids, one image each, ending with EOS (GPT-2's 50256)."""
    rng = np.random.default_rng(seed)
    token_ids = [
        rng.integers(0, 50256, rng.integers(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1)).tolist()
        for _ in range(num_captions)
    ]
    embeds = torch.randn(num_captions, 512, generator=torch.Generator().manual_seed(seed)).half()
    return CaptionTargets.from_token_ids(
        token_ids, np.arange(num_captions), embeds, eos_token_id=50256, pad_token_id=50256
    )


def clipcap_batch(targets: CaptionTargets, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """ClipCap's layout: the caption without EOS, zero-padded to the longest caption of the data
    set; the padding is masked in attention and loss but still computed."""
    lengths = targets.lengths[indices] - 1  # no EOS
    width = CAPTION_TOKENS[1]
    mask = torch.from_numpy(np.arange(width) < lengths[:, None]).long()
    input_ids = torch.from_numpy(targets.ids[indices, :width].astype(np.int64)).masked_fill(mask == 0, 0)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100),
             "image_embeds": targets.embeds[indices].float()}  # fmt: skip
    return {name: tensor.to(device) for name, tensor in batch.items()}


def samples_per_second(
    step: Callable[[int], None], batch_size: int, steps: int, warmup: int, device: torch.device
) -> float:
    """Throughput of `step(i)` over `steps` timed calls after `warmup` untimed ones."""
    for i in range(warmup):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def bench_clipcap(
    model: CaptionModel, targets: CaptionTargets, args: argparse.Namespace, device: torch.device
) -> float:
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, foreach=False)

    def step(i: int) -> None:
        batch = clipcap_batch(targets, np.arange(i * CLIPCAP_BATCH, (i + 1) * CLIPCAP_BATCH), device)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return samples_per_second(step, CLIPCAP_BATCH, args.steps, args.warmup, device)


def bench_prefixcap(
    model: CaptionModel, targets: CaptionTargets, args: argparse.Namespace, config: TrainConfig
) -> float:
    accelerator = build_accelerator(config)
    optimizer = build_optimizer(model.to(accelerator.device), config, accelerator.device)
    scheduler = build_scheduler(optimizer, config, total_steps=args.steps + args.warmup)
    objective, optimizer = accelerator.prepare(CaptionLoss(model), optimizer)
    objective.train()

    def step(i: int) -> None:
        batch = targets.batch(np.arange(i * config.batch_size, (i + 1) * config.batch_size))
        train_step(objective, optimizer, scheduler, accelerator, [batch], config.max_grad_norm)

    return samples_per_second(step, config.batch_size, args.steps, args.warmup, accelerator.device)


def stand_in_captions(count: int, rng: np.random.Generator, vocabulary: int = 2000) -> list[str]:
    """COCO-like word sequences: 8-16 words, Zipf-distributed over `vocabulary` words."""
    ranks = np.arange(1, vocabulary + 1)
    probabilities = 1 / ranks / (1 / ranks).sum()
    return [
        " ".join(f"w{word}" for word in rng.choice(vocabulary, rng.integers(8, 17), p=probabilities))
        for _ in range(count)
    ]


def bench_scst(model: CaptionModel, args: argparse.Namespace, config: TrainConfig) -> dict[str, float]:
    """Sampled captions per second of SCST steps, and the shares of sampling and reward in them."""
    from prefixcap.evaluation.cider import CiderD

    accelerator = build_accelerator(config)
    optimizer = build_optimizer(model.to(accelerator.device), config, accelerator.device)
    scheduler = build_scheduler(optimizer, config, total_steps=args.steps + args.warmup)
    images, k = (args.steps + args.warmup) * config.batch_size, args.samples_per_image
    rng = np.random.default_rng(0)
    references = [stand_in_captions(5, rng) for _ in range(images)]
    cider = CiderD(references)

    def reward(captions, image_indices):  # stand-ins for the sampled noise, scored as real captions are
        return cider(stand_in_captions(len(captions), rng), [references[i] for i in image_indices])

    embeds = torch.randn(images, model.config.embed_dim, generator=torch.Generator().manual_seed(0)).half()
    scst = SelfCritical(model, reward, embeds, [""] * images, samples_per_image=k, max_new_tokens=20)
    objective, optimizer = accelerator.prepare(SCSTLoss(model), optimizer)
    objective.eval()

    def step(i: int) -> None:
        if i == args.warmup:  # time the timed steps only
            scst.report(0.0, {})
        batch = np.arange(i * config.batch_size, (i + 1) * config.batch_size)
        micro_batches = scst.step_batches([batch], (0, i, 0))
        train_step(objective, optimizer, scheduler, accelerator, micro_batches, config.max_grad_norm)

    rate = samples_per_second(step, config.batch_size * k, args.steps, args.warmup, accelerator.device)
    seconds = config.batch_size * k * args.steps / rate
    return {"samples_per_s": rate, **{name: value for name, value in scst.report(seconds, {}).items()
                                       if name.endswith("_share")}}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if available)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="prefixcap's batch size (default: 256)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument(
        "--compile", action="store_true", help="prefixcap's step with torch.compile (`train --compile`)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the built full-size model here and reuse it (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--objective", choices=("xent", "scst"), default="xent",
        help="xent: ClipCap's step against prefixcap's; scst: prefixcap's self-critical step (default: xent)",
    )  # fmt: skip
    parser.add_argument("--samples-per-image", type=int, default=5, help="scst: captions per image (default: 5)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if (device.type == "cuda") != torch.cuda.is_available():  # Accelerate takes the GPU whenever there is one
        parser.error(f"--device {args.device} on a machine {'without' if device.type == 'cuda' else 'with'} CUDA "
                     "(for CPU figures on a GPU machine, set CUDA_VISIBLE_DEVICES=)")  # fmt: skip
    transformers.utils.logging.set_verbosity_error()
    config = TrainConfig(
        batch_size=args.batch_size,
        precision=default_precision() if device.type == "cuda" else "fp32",
        compile=args.compile,
    )
    total = args.steps + args.warmup
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    if args.objective == "scst":
        with tempfile.TemporaryDirectory() as tmp:
            scst = bench_scst(CaptionModel.from_pretrained(build_full_size_model(args.workdir or tmp)), args, config)
        results = {"device": f"{device.type}: {name}", "torch": torch.__version__, "steps": args.steps,
                   "scst": {**scst, "images_per_step": config.batch_size, "samples_per_image": args.samples_per_image,
                            "precision": config.precision, "reward": "cider"}}  # fmt: skip
        print(f"device: {results['device']} | torch {torch.__version__} | {args.steps} timed steps")
        print(f"SCST ({config.precision}, {config.batch_size} images x {args.samples_per_image} samples, CIDEr-D): "
              f"{scst['samples_per_s']:,.1f} sampled captions/s; reward {scst['reward_share']:.1%} and sampling "
              f"{scst['sample_share']:.1%} of the step time")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return
    targets = random_targets(total * max(args.batch_size, CLIPCAP_BATCH))

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_full_size_model(args.workdir or tmp)
        clipcap = bench_clipcap(CaptionModel.from_pretrained(model_dir), targets, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ours = bench_prefixcap(CaptionModel.from_pretrained(model_dir), targets, args, config)

    optimizer = "AdamW (fused)" if device.type == "cuda" else "AdamW"
    results = {
        "device": f"{device.type}: {name}", "torch": torch.__version__, "steps": args.steps,
        "clipcap_style": {"samples_per_s": clipcap, "batch_size": CLIPCAP_BATCH, "precision": "fp32",
                          "optimizer": "AdamW (per-parameter loop)"},
        "prefixcap": {"samples_per_s": ours, "batch_size": config.batch_size, "precision": config.precision,
                      "optimizer": optimizer, "compile": config.compile},
        "ratio": ours / clipcap,
    }  # fmt: skip
    print(f"device: {results['device']} | torch {torch.__version__} | {args.steps} timed steps each")
    compiled = ", compiled" if config.compile else ""
    clipcap_setup = f"fp32, batch {CLIPCAP_BATCH}, padded to {CAPTION_TOKENS[1]} tokens"
    print(f"(a) ClipCap-style: {clipcap_setup}: {clipcap:,.1f} samples/s")
    prefixcap_setup = f"{config.precision}, batch {config.batch_size}, padded per batch{compiled}"
    print(f"(b) prefixcap: {prefixcap_setup}: {ours:,.1f} samples/s")
    print(f"ratio (b)/(a): {ours / clipcap:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
