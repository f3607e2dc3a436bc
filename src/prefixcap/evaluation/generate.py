"""Caption every image of an evaluation split, batched: from stored features or from the images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from prefixcap.data import CaptionRecord
from prefixcap.modeling import CaptionModel


@torch.inference_mode()
def caption_records(
    model: CaptionModel,
    records: Sequence[CaptionRecord],
    *,
    embeddings: torch.Tensor | None = None,
    batch_size: int = 32,
    num_workers: int = 4,
    **generation_kwargs: Any,
) -> tuple[dict[str, str], dict[str, str]]:
    """({image id: caption}, {image: why it could not be read}) for `records`, in their order.

    With `embeddings` (a feature store's rows, one per record) the image encoder is skipped;
    otherwise worker processes decode the images while the model captions the previous batch.
    One caption per image: the first (best) of `num_return_sequences`.
    """
    captions: dict[str, str] = {}
    failures: dict[str, str] = {}
    with tqdm(total=len(records), desc="captioning", unit="img", disable=None) as bar:
        for indices, inputs in _batches(model, records, embeddings, batch_size, num_workers, failures, bar):
            # 1. Generate from image embeddings or uint8 pixels (generate moves and normalises them).
            texts = model.decode(model.generate(**inputs, **generation_kwargs))
            # 2. Keep the first caption of each image.
            per_image = len(texts) // len(indices)
            for index, text in zip(indices, texts[::per_image]):
                captions[records[index].image_id] = text
            bar.update(len(indices))
    return captions, failures


def _batches(
    model: CaptionModel,
    records: Sequence[CaptionRecord],
    embeddings: torch.Tensor | None,
    batch_size: int,
    num_workers: int,
    failures: dict[str, str],
    bar: tqdm,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(record indices, generate() inputs) per batch; unreadable images go to `failures`."""
    if embeddings is not None:
        for start in range(0, len(records), batch_size):
            stop = min(start + batch_size, len(records))
            yield list(range(start, stop)), {"image_embeds": embeddings[start:stop]}
        return
    from prefixcap.prepare import ImageDataset  # prepare's loader: files and WebDataset members
    from prefixcap.preprocess import stack_pixels

    images = ImageDataset([record.image for record in records], model.preprocessor)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=stack_pixels)
    for indices, pixels, errors in loader:
        failures |= {records[index].image: reason for index, reason in errors.items()}
        bar.update(len(errors))
        if pixels is not None:
            yield indices, {"pixel_values": pixels}
