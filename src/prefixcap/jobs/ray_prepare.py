"""`prepare` on a Ray cluster: a caption dataset's images encoded into the same feature store
that `prepare_features` writes in-process (`prefixcap.pipeline.features`), readable by `train`
unchanged.

The plan is the in-process one (`plan_store`: the records in shards, each fingerprinted by its
records and the encoder's id, files, preprocessing and feature kind; finished shards kept). The
images of the shards left to do go through Ray Data (`RayCluster.map_units`): tasks decode and
preprocess them on any node with CPUs, and an actor pool of `PrefixEncoder`s (`num_gpus` each, one
encoder per actor, loaded once) encodes them. This process writes each shard, atomically, as soon
as all its images are back (`ShardWriter`), and the manifest once every shard exists. So a killed
job loses only the shards in flight, a rerun encodes only the shards not yet written (nothing, for
a finished store: no cluster is joined), an encoder saved again at the same path redoes them all,
and an image that cannot be read is a failure record in its shard and in `bad_images.jsonl`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from prefixcap.errors import ImageLoadError
from prefixcap.inputs.images import DEFAULT_MAX_PIXELS
from prefixcap.inputs.loader import ImageLoader
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.jobs.ray_units import RayCluster, failed_rows, on_torch_thread
from prefixcap.model.caption_model import embed_pixels
from prefixcap.model.encoders import load_image_processor
from prefixcap.pipeline.features import StoreManifest
from prefixcap.pipeline.prepare import ShardWriter, load_encoder, plan_store
from prefixcap.system.hardware import parse_device

RESULT = "embedding"  # the column of each image's features: float16 bytes, C order, of the store's row shape


class PrefixEncoder:
    """A callable class for `Dataset.map_batches`: one image encoder per actor, loaded once
    (`encoder`: a hub id or a folder every node can read), on `device` (float16 on a GPU, as
    in-process). Takes batches of decoded uint8 [3, H, W] `pixels` (`decode_units`'s rows) and
    returns them without `pixels`, plus `embedding`: each image's pooled embedding (`features=
    "patches"`: its patch tokens) as float16 bytes, null where `error` is set."""

    def __init__(self, encoder: str, *, features: str = "pooled", device: str = "cpu"):
        self.encoder = on_torch_thread(load_encoder, encoder, parse_device(device))
        self.preprocessor = ImagePreprocessor(load_image_processor(encoder))
        self.patches = features == "patches"

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return on_torch_thread(self._encoded, batch)

    @torch.inference_mode()
    def _encoded(self, batch: dict[str, Any]) -> dict[str, Any]:
        errors = failed_rows(batch)
        good = [row for row, error in enumerate(errors) if error is None]
        cells: list[bytes | None] = [None] * len(errors)
        if good:
            pixels = torch.as_tensor(np.stack([np.asarray(batch["pixels"][row]) for row in good]))
            embeds = embed_pixels(self.encoder, self.preprocessor, pixels, patches=self.patches)
            for row, embed in zip(good, embeds.to(torch.float16).cpu().numpy(), strict=True):
                cells[row] = embed.tobytes()
        out = {name: values for name, values in batch.items() if name != "pixels"}
        out[RESULT] = np.array(cells, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        return out


def prepare_on_ray(
    cluster: RayCluster,
    source: str | Path,
    out: str | Path,
    *,
    batch_size: int = 256,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    **store: Any,
) -> StoreManifest:
    """Build (or finish) the feature store at `out` from the dataset at `source` on `cluster`, as
    `prepare_features` does in one process (see the module's docstring). `store`: the dataset
    and store options of `plan_store` (`images_root`, `format`, `vision_encoder`, `shard_size`,
    `features`, `overwrite`, ...); `batch_size` images per decoding task and encoder batch."""
    plan = plan_store(source, out, **store)
    plan.start()
    todo = [number for number, finished in enumerate(plan.finished) if not finished]
    if todo:  # (a rerun over a finished store joins no cluster)
        writer = ShardWriter(plan, todo)
        encoder = {
            "encoder": plan.settings["encoder"], "features": plan.features,
            "device": "cuda" if cluster.gpus_per_actor else "cpu",
        }  # fmt: skip
        with tqdm(total=writer.images, desc="encoding on Ray", unit="img", disable=None, file=sys.stderr) as bar:
            results = cluster.map_units(
                writer.units(batch_size), loader=ImageLoader(plan.preprocessor, max_pixels=max_pixels),
                batch_size=batch_size, actor=PrefixEncoder, actor_kwargs=encoder, result=RESULT, progress=bar,
            )  # fmt: skip
            for unit, outcomes in results:
                for position, (_, outcome) in enumerate(outcomes):
                    writer.add(unit * batch_size + position, _features(outcome, plan.row_shape))
    return plan.finish()


def _features(outcome: bytes | ImageLoadError, row_shape: tuple[int, ...]) -> torch.Tensor | ImageLoadError:
    """An image's features from the bytes an actor sent, or the failure as it came."""
    if isinstance(outcome, ImageLoadError):
        return outcome
    return torch.from_numpy(np.frombuffer(outcome, dtype=np.float16).reshape(row_shape).copy())
