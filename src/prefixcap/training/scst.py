"""Self-critical sequence training (SCST, Rennie et al., CVPR 2017), `prefixcap train --objective scst`.

A model trained with cross-entropy is fine-tuned on a reward of its own captions. Each step, for
each image of the batch:

1. sample k captions with the decoding engine (batched, `CaptionModel.generate(do_sample=True,
   num_return_sequences=k)`, plain sampling: temperature 1, no top-k/top-p, no penalties), after
   the image's prompt, as `caption` continues it;
2. reward each with CIDEr-D against the image's training references (document frequencies from
   all training references, computed once, as the standard training code does), CLIP-S, or a
   weighted sum of both;
3. subtract a baseline: by default the mean reward of the image's *other* k-1 samples (Luo 2020,
   "A Better Variant of Self-Critical Sequence Training"), which needs no extra decoding; or the
   reward of the image's greedy caption (Rennie's original);
4. loss = -(reward - baseline) * log p(sampled token), summed over the caption's tokens up to and
   including its stop token (the prompt and the padding after the stop count nothing), divided by
   the number of such tokens in the micro-batch, as self-critical.pytorch's `RewardCriterion`
   does: the loss then has a per-token scale, like cross-entropy's, whatever k and the lengths.

CIDEr-D is pure Python (about 4,000 captions a second on one core): with a GPU's fast sampling and
step it would dominate, so it runs over chunks of the batch's images in forked worker processes
(`PooledReward`), and each window's log says what share of the step the reward took.

The log-probabilities come from a teacher-forced pass with gradients over [prefix; prompt;
sample], the same pass as the cross-entropy objective's (`CaptionLoss.target_logits`). SCST runs
without dropout: the captions are sampled from the model as it captions, and the gradient is that
of the same policy's log-probabilities.

Sampling seeds are a function of (seed, step, process, micro-batch, prompt), so a resumed run
samples the same captions as one that was never interrupted.

The CLIP-S reward scores captions against the feature store's image embeddings: the store keeps
the captioner's projected CLIP image embeddings, which are exactly CLIPScore's image features when
the reward CLIP is the captioner's encoder. It keeps the images' paths but not their pixels, and
re-encoding every training image with another CLIP would be a second `prepare` (the images may
not even be where they were). So the reward CLIP (the full CLIP of the model's own encoder, or
`--reward-clip`) must have the captioner's image tower, checked weight for weight; any other is
refused rather than scored against another model's features. With `--baseline mean` the logged
baseline equals the mean reward by construction; with `greedy` it is the greedy captions' reward.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from prefixcap.data import CaptionRecord
from prefixcap.errors import UserError
from prefixcap.model.caption_model import CaptionModel
from prefixcap.training.config import TrainConfig
from prefixcap.training.objective import CaptionLoss

# A reward: k captions per image (image after image) and the images' indices into the training
# set -> one float per caption.
Reward = Callable[[Sequence[str], np.ndarray], np.ndarray]
# Pure sampling from the model's distribution: the model's own generation defaults (beams,
# penalties, top-k) would make the sampled captions follow another distribution than the one whose
# log-probabilities are trained.
_POLICY = {
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "min_new_tokens": 0, "num_beams": 1,
}  # fmt: skip
# Running sums kept in `Progress.sums`: means per micro-batch, summed, with their count; seconds.
_SUMS = ("reward", "baseline", "batches", "reward_s", "sample_s", "seconds")


class SCSTLoss(CaptionLoss):
    """The SCST policy-gradient loss of a batch from `SelfCritical.batch`; what Accelerate wraps."""

    def forward(  # type: ignore[override]
        self,
        *,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        advantages: torch.Tensor,
    ) -> torch.Tensor:
        """-sum(advantage * log p(sampled token)) / sampled tokens. `labels` are the sampled
        tokens, -100 on prompts and after each caption's stop token; `advantages` [B] are
        reward - baseline per caption."""
        targets = labels != -100
        logits = self.target_logits(image_embeds, input_ids, targets).float()
        log_probs = -F.cross_entropy(logits, labels[targets], reduction="none")
        weights = advantages[:, None].expand_as(labels)[targets].to(log_probs.dtype)
        return -(weights * log_probs).sum() / targets.sum().clamp(min=1)


class SelfCritical:
    """Samples, rewards and baselines for SCST steps, and the running statistics of the reward.

    `prompts[i]` is training image i's prompt ("" for none) and `embeds[i]` its image embedding."""

    def __init__(
        self,
        model: CaptionModel,
        reward: Reward,
        embeds: torch.Tensor,
        prompts: Sequence[str],
        *,
        samples_per_image: int = 5,
        baseline: str = "mean",
        max_new_tokens: int = 20,
        reward_name: str = "cider",
    ) -> None:
        if baseline == "mean" and samples_per_image < 2:
            raise UserError("--baseline mean needs --samples-per-image 2 or more")
        self.model = model
        self.reward = reward
        self.embeds = embeds
        self.prompts = list(prompts)
        self.k = samples_per_image
        self.baseline = baseline
        self.max_new_tokens = max_new_tokens
        self.reward_name = reward_name
        self.stop_ids = torch.tensor(model.stop_token_ids())
        self._prompt_ids = {text: model.prompt_ids(text) for text in set(self.prompts)}
        self.window = dict.fromkeys(_SUMS, 0.0)  # since the last `report`

    def describe(self) -> str:
        baseline = "mean of the other samples" if self.baseline == "mean" else "greedy caption"
        return (
            f"SCST: {self.k} sampled captions per image of up to {self.max_new_tokens} tokens, reward "
            f"{self.reward_name}, baseline: {baseline}"
        )

    # ------------------------------------------------------------------ one step
    def step_batches(self, micro_images: Sequence[np.ndarray], seed: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """The loss inputs of one optimizer step, one per micro-batch of training image indices;
        `seed` (e.g. (run seed, step, process)) fixes every caption sampled."""
        return [self.batch(images, [*seed, index]) for index, images in enumerate(micro_images)]

    @torch.no_grad()
    def batch(self, images: np.ndarray, seed: Sequence[int]) -> dict[str, torch.Tensor]:
        """Sample k captions per image, reward them and build the `SCSTLoss` inputs (on the CPU)."""
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()  # sampling without dropout, in the decoder's own dtype (the engine's)
        start = time.perf_counter()
        samples = self._generate(images, seed, sample=True)  # [B * k] token lists, each ending at its stop
        texts = self._texts(samples)
        greedy_texts = self._texts(self._generate(images, seed, sample=False)) if self.baseline == "greedy" else None
        sampled_at = time.perf_counter()
        rewards = self.reward(texts, images).reshape(len(images), self.k)
        if greedy_texts is None:
            advantages = mean_of_others_advantages(rewards)
        else:
            advantages = rewards - self.reward(greedy_texts, images)[:, None]
        baselines = rewards - advantages
        self.window["sample_s"] += sampled_at - start
        self.window["reward_s"] += time.perf_counter() - sampled_at
        self.window["reward"] += float(rewards.mean())
        self.window["baseline"] += float(baselines.mean())
        self.window["batches"] += 1
        for module, training in modes.items():
            module.train(training)
        return self._inputs(images, samples, advantages.reshape(-1))

    def _generate(self, images: np.ndarray, seed: Sequence[int], *, sample: bool) -> list[list[int]]:
        """Token ids per caption (k per image when sampling, else 1), image after image, each cut
        after its first stop token. Images are decoded in groups that share a prompt."""
        per_image = self.k if sample else 1
        rows: list[list[int]] = [[] for _ in range(len(images) * per_image)]
        prompts = [self.prompts[image] for image in images]
        for group, prompt in enumerate(dict.fromkeys(prompts)):
            members = [i for i, other in enumerate(prompts) if other == prompt]
            options: dict[str, Any] = {**_POLICY, "max_new_tokens": self.max_new_tokens, "do_sample": sample}
            if sample:
                options.update(num_return_sequences=self.k, seed=sampling_seed([*seed, group]))
            ids = self.model.generate(
                image_embeds=self.embeds[torch.from_numpy(images[members])].to(self.model.device),
                prompt=prompt,
                **options,
            ).cpu()
            for position, row in enumerate(_cut_after_stop(ids, self.stop_ids)):
                member, index = divmod(position, per_image)
                rows[members[member] * per_image + index] = row
        return rows

    def _texts(self, rows: list[list[int]]) -> list[str]:
        """The captions' texts, decoded as `CaptionModel.caption` decodes them (padded, in one batch)."""
        ids = torch.full((len(rows), max(map(len, rows))), self.model.tokenizer.pad_token_id, dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        return self.model.detokenize(ids)

    def _inputs(self, images: np.ndarray, samples: list[list[int]], advantages: np.ndarray) -> dict[str, torch.Tensor]:
        """[prompt; sample] rows, padded on the right, with labels on the sampled tokens only."""
        pad = self.model.tokenizer.pad_token_id
        prompt_rows = [self._prompt_ids[self.prompts[image]] for image in np.repeat(images, self.k)]
        width = max(len(prompt) + len(sample) for prompt, sample in zip(prompt_rows, samples))
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), -100, dtype=torch.long)
        for row, (prompt, sample) in enumerate(zip(prompt_rows, samples)):
            input_ids[row, : len(prompt) + len(sample)] = torch.tensor([*prompt, *sample], dtype=torch.long)
            labels[row, len(prompt) : len(prompt) + len(sample)] = torch.tensor(sample, dtype=torch.long)
        return {
            "image_embeds": self.embeds[torch.from_numpy(np.repeat(images, self.k))],
            "input_ids": input_ids,
            "labels": labels,
            "advantages": torch.from_numpy(advantages.astype(np.float32)),
        }

    # ------------------------------------------------------------------ statistics
    def report(self, seconds: float, sums: dict[str, float]) -> dict[str, float]:
        """Means over the steps since the last report, which took `seconds` in all: reward, baseline
        and the shares of the time spent rewarding and sampling. Adds the window to the epoch's
        running `sums` (a run's `Progress.sums`) and starts a new window."""
        self.window["seconds"] = seconds
        for name in _SUMS:
            sums[name] = sums.get(name, 0.0) + self.window[name]
        values = window_metrics(self.window)
        self.window = dict.fromkeys(_SUMS, 0.0)
        return values


def window_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Mean reward and baseline of the sampled captions, and the shares of the time spent in the
    reward and in sampling, from running `sums` (a window's, or the epoch's for metrics.csv)."""
    seconds, batches = max(sums.get("seconds", 0.0), 1e-9), max(sums.get("batches", 0.0), 1.0)
    return {
        "reward": sums.get("reward", 0.0) / batches,
        "baseline": sums.get("baseline", 0.0) / batches,
        "reward_share": sums.get("reward_s", 0.0) / seconds,
        "sample_share": sums.get("sample_s", 0.0) / seconds,
    }


def mean_of_others_advantages(rewards: np.ndarray) -> np.ndarray:
    """reward - the mean reward of the image's other k - 1 samples, for rewards [B, k]: O(B*k),
    as (sum - own) / (k - 1). Measured from each image's first reward, so that equal rewards give
    exactly 0 (no rounding in the sum), and the gradient with them."""
    shifted = rewards - rewards[:, :1]
    return shifted - (shifted.sum(axis=1, keepdims=True) - shifted) / (rewards.shape[1] - 1)


def sampling_seed(parts: Sequence[int]) -> int:
    """A 63-bit seed that follows from `parts` alone (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(1, np.uint64)[0] >> 1)


def _cut_after_stop(ids: torch.Tensor, stop_ids: torch.Tensor) -> list[list[int]]:
    """Each row up to and including its first stop token (all of it when it never stops)."""
    is_stop = torch.isin(ids, stop_ids)
    stops = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, ids.shape[1])
    return [row[:length].tolist() for row, length in zip(ids, stops.tolist())]


# ---------------------------------------------------------------------- rewards
def build_reward(
    config: TrainConfig,
    model: CaptionModel,
    records: Sequence[CaptionRecord],
    embeds: torch.Tensor,
    *,
    workers: int = 1,
) -> Reward:
    """The reward `config.reward` names, over the training `records` (whose image embeddings are
    `embeds`): CIDEr-D against each image's references (in `workers` processes), CLIP-S, or their
    weighted sum."""
    from prefixcap.evaluation.cider import CiderD

    parts: list[tuple[float, Reward]] = []
    cider_weight, clip_weight = config.reward_weight_pair if config.reward == "cider+clipscore" else (1.0, 1.0)
    if "cider" in config.reward:
        references = [list(record.captions) for record in records]
        # document frequencies from every training image's references, once
        parts.append((cider_weight, PooledReward(CiderReward(CiderD(references), references), workers)))
    if "clipscore" in config.reward:
        parts.append((clip_weight, clip_reward(model, embeds, config.reward_clip)))
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]
    return lambda captions, images: sum(weight * part(captions, images) for weight, part in parts)


class CiderReward:
    """CIDEr-D of captions against their training images' references (a picklable `Reward`)."""

    def __init__(self, cider: Any, references: Sequence[Sequence[str]]) -> None:
        self.cider = cider
        self.references = references

    def __call__(self, captions: Sequence[str], images: np.ndarray) -> np.ndarray:
        return self.cider(captions, [self.references[image] for image in images])


class PooledReward:
    """A CPU-bound `reward` run over chunks of the images in `workers` forked processes (1: in this
    one). Forked, as DataLoader workers are, so the reward's tables are shared, not copied; the
    workers never touch torch or a GPU. They start at the first call and end with this object."""

    def __init__(self, reward: Reward, workers: int = 1) -> None:
        self.reward = reward
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, captions: Sequence[str], images: np.ndarray) -> np.ndarray:
        if self.workers <= 1 or len(images) < 2 * self.workers:
            return self.reward(captions, images)
        if self._pool is None:
            context = multiprocessing.get_context("fork")
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_set_worker_reward, initargs=(self.reward,)
            )
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        k = len(captions) // len(images)
        chunks = [chunk for chunk in np.array_split(np.arange(len(images)), self.workers) if len(chunk)]
        futures = [
            self._pool.submit(_worker_reward, list(captions[chunk[0] * k : (chunk[-1] + 1) * k]), images[chunk])
            for chunk in chunks
        ]
        return np.concatenate([future.result() for future in futures])


_worker: Reward | None = None  # a PooledReward worker's reward


def _set_worker_reward(reward: Reward) -> None:
    global _worker
    _worker = reward


def _worker_reward(captions: list[str], images: np.ndarray) -> np.ndarray:
    assert _worker is not None
    return _worker(captions, images)


def reward_workers(processes: int) -> int:
    """Worker processes for the CIDEr-D reward of each of `processes` training processes: the CPU
    cores this process may use, shared, less one for the training process itself; at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // max(1, processes) - 1))


def clip_reward(model: CaptionModel, embeds: Any, clip_model: str | None) -> Reward:
    """CLIP-S (Hessel's scale: 2.5 * max(cos, 0)) of each caption against its image's stored
    embedding; the reward CLIP must have the captioner's image tower (see the module docstring)."""
    from prefixcap.evaluation.clipscore import CLIPScorer, clip_s

    if len(embeds.shape) != 2:
        raise UserError(
            "the clipscore reward scores captions against pooled image embeddings, and this feature store holds "
            "patch tokens; use --reward cider"
        )
    name = clip_model or str(model.config.vision_encoder)
    scorer = CLIPScorer.from_pretrained(name, device=str(model.device), flag="--reward-clip")
    if not same_image_tower(scorer.model, model.vision_encoder):
        raise UserError(
            f"--reward-clip {name}: its image tower is not the captioner's encoder ({model.config.vision_encoder}); "
            "the feature store holds that encoder's image embeddings, not images, so CLIP-S needs its full CLIP"
        )
    image_features = embeds.float()

    def reward(captions: Sequence[str], images: np.ndarray) -> np.ndarray:
        k = len(captions) // len(images)
        texts = scorer.embed_texts(list(captions))
        return clip_s(image_features[torch.from_numpy(np.repeat(images, k))], texts).double().numpy()

    return reward


def same_image_tower(clip: torch.nn.Module, vision_encoder: torch.nn.Module) -> bool:
    """Whether a full CLIPModel's vision tower and projection hold exactly the weights of
    `vision_encoder` (a CLIPVisionModelWithProjection, or a wrapper of one as its `model`)."""
    ours = getattr(vision_encoder, "model", vision_encoder).state_dict()
    theirs = {
        name: tensor
        for name, tensor in clip.state_dict().items()
        if name.startswith(("vision_model.", "visual_projection."))
    }
    return ours.keys() == theirs.keys() and all(
        ours[name].shape == theirs[name].shape and torch.equal(ours[name].cpu().float(), theirs[name].cpu().float())
        for name in ours
    )
