"""Caption every image of an evaluation split, batched: from stored features or from the images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from prefixcap.captioner import Captioner
from prefixcap.data import CaptionRecord
from prefixcap.errors import ImageLoadError


@torch.inference_mode()
def caption_records(
    captioner: Captioner,
    records: Sequence[CaptionRecord],
    *,
    embeddings: torch.Tensor | None = None,
    batch_size: int = 32,
    workers: int = 4,
    **generation_kwargs: Any,
) -> tuple[dict[str, str], list[ImageLoadError]]:
    """({image id: caption}, why each unreadable image could not be read) for `records`, in their order.

    With `embeddings` (a feature store's rows, one per record) the image encoder is skipped;
    otherwise worker processes decode the images while the model captions the previous batch.
    One caption per image: the first (best) of `num_return_sequences`. Records that carry a
    prompt are captioned after it, as the model was trained (one pass per distinct prompt), unless
    `prompt` is given for all.
    """
    if "prompt" not in generation_kwargs and any(record.prompt for record in records):
        return _caption_per_prompt(captioner, records, embeddings, batch_size, workers, generation_kwargs)
    captions: dict[str, str] = {}
    failures: list[ImageLoadError] = []
    with tqdm(total=len(records), desc="captioning", unit="img", disable=None) as bar:
        if embeddings is not None:
            for start in range(0, len(records), batch_size):
                texts = captioner.caption_embeds(embeddings[start : start + batch_size], **generation_kwargs)
                for record, per_image in zip(records[start:], texts):
                    captions[record.image_id] = per_image[0]
                bar.update(len(texts))
            return captions, failures
        images = [record.image for record in records]  # files or "shard.tar#member", one image each
        outcomes = captioner.stream(
            images, batch_size=batch_size, workers=workers, processes=True, progress=bar, **generation_kwargs
        )
        for record, (_, outcome) in zip(records, outcomes):
            if isinstance(outcome, ImageLoadError):
                failures.append(outcome)
            else:
                captions[record.image_id] = outcome[0]
    return captions, failures


def _caption_per_prompt(
    captioner: Captioner,
    records: Sequence[CaptionRecord],
    embeddings: torch.Tensor | None,
    batch_size: int,
    workers: int,
    generation_kwargs: dict[str, Any],
) -> tuple[dict[str, str], list[ImageLoadError]]:
    """`caption_records` with each record's own prompt ("" for a record without one)."""
    prompts = [record.prompt or "" for record in records]
    captions: dict[str, str] = {}
    failures: list[ImageLoadError] = []
    for prompt in dict.fromkeys(prompts):
        rows = [row for row, other in enumerate(prompts) if other == prompt]
        found, failed = caption_records(
            captioner, [records[row] for row in rows], embeddings=None if embeddings is None else embeddings[rows],
            batch_size=batch_size, workers=workers, prompt=prompt, **generation_kwargs,
        )  # fmt: skip
        captions.update(found)
        failures += failed
    order = [record.image_id for record in records]
    return {image_id: captions[image_id] for image_id in order if image_id in captions}, failures
