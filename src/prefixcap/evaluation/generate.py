"""Caption every image of an evaluation split, batched: from stored features or from the images, through
the caption loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from prefixcap.captioner import Captioner
from prefixcap.data import CaptionRecord
from prefixcap.errors import ImageLoadError
from prefixcap.options import CaptionRequest
from prefixcap.pipeline import loop as caption_loop


@torch.inference_mode()
def caption_records(
    captioner: Captioner,
    records: Sequence[CaptionRecord],
    *,
    embeddings: torch.Tensor | None = None,
    batch_size: int = 32,
    workers: int = 4,
    request: CaptionRequest | None = None,
    **kwargs: Any,
) -> tuple[dict[str, str], list[ImageLoadError]]:
    """({image id: caption}, why each unreadable image could not be read) for `records`, in their order.

    With `embeddings` (a feature store's rows, one per record) the image encoder is skipped;
    otherwise worker processes decode the images while the model captions the previous batch.
    One caption per image: the first (best) of `num_return_sequences`. The options are a `request`
    or the keyword arguments it is made of. Records that carry a prompt are captioned after it (a
    record without one: after none), as the model was trained, unless the request names a prompt
    for all.
    """
    request = captioner.request(request, **kwargs)
    prompts = None
    if request.text.prompt is None and any(record.prompt for record in records):
        prompts = [record.prompt or "" for record in records]
    captions: dict[str, str] = {}
    failures: list[ImageLoadError] = []
    with tqdm(total=len(records), desc="captioning", unit="img", disable=None) as bar:
        if embeddings is not None:
            for start in range(0, len(records), batch_size):
                rows = slice(start, start + batch_size)
                texts = caption_loop.caption_batch(
                    captioner.model, request, image_embeds=embeddings[rows], prompts=prompts and prompts[rows]
                )
                for record, per_image in zip(records[rows], texts):
                    captions[record.image_id] = per_image[0]
                bar.update(len(texts))
            return captions, failures
        images = [record.image for record in records]  # files or "shard.tar#member", one image each
        loop = captioner.loop(request, batch_size=batch_size, workers=workers, processes=True, progress=bar)
        for record, (_, outcome) in zip(records, loop.stream(images, prompts)):
            if isinstance(outcome, ImageLoadError):
                failures.append(outcome)
            else:
                captions[record.image_id] = outcome[0]
    return captions, failures
