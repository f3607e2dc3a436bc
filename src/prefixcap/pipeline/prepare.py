"""Encode every image of a caption dataset once, into a feature store (layout in `features`):
pooled embeddings, or patch tokens (`features="patches"`, for the resampler mapper).

Images are read and preprocessed by DataLoader worker processes while the encoder runs on the
previous batch. Under `accelerate launch` or `torchrun`, shard i is encoded by process
i % num_processes; each process writes only its own shards, and the main process writes the
manifest once all of them exist, so any number of processes gives the same store as one.

`plan_store` (what the store must hold, which shards a rerun keeps) and `ShardWriter` (shards
written as their images come in) are shared with `prepare` on a Ray cluster
(`prefixcap.jobs.ray_prepare`), which writes the same store.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from prefixcap.data import CaptionRecord, load_records
from prefixcap.data.hf import export_dataset, is_dataset_object
from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.images import DEFAULT_MAX_PIXELS
from prefixcap.inputs.loader import Batch, ImageLoader, chunked
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.caption_model import embed_pixels
from prefixcap.model.config import DEFAULT_VISION_ENCODER, FEATURE_KINDS, normalize_model_id
from prefixcap.model.encoders import (
    EncoderSpec,
    ImageEncoder,
    load_encoder_config,
    load_image_encoder,
    load_image_processor,
)
from prefixcap.model.fingerprint import source_fingerprint
from prefixcap.pipeline.features import (
    MANIFEST,
    StoreManifest,
    finish_store,
    is_feature_store,
    is_finished,
    preprocessing_of,
    shard_fingerprint,
    write_shard,
)
from prefixcap.system.atomic import check_output_dir
from prefixcap.system.processes import process_state


def prepare_features(
    source: str | Path,
    out: str | Path,
    *,
    images_root: str | Path | None = None,
    format: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    vision_encoder: str | Path = DEFAULT_VISION_ENCODER,
    batch_size: int = 256,
    shard_size: int = 2048,
    num_workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    features: str = "pooled",
    allow_outside_root: bool = False,
) -> StoreManifest | None:
    """Build (or finish) the feature store at `out`; returns its manifest on the main process and
    None on the others. Finished shards from an earlier run with the same inputs are kept. `out`
    must be new, empty or such a store: a folder holding anything else is refused, and a store
    none of whose shards these inputs share is replaced only with `overwrite`. `features`:
    "pooled" stores each image's pooled embedding, "patches" its patch tokens (for a resampler
    mapper; the size is printed before encoding starts). `allow_outside_root`: see `load_records`."""
    state = process_state()
    plan = plan_store(
        source, out, images_root=images_root, format=format, image_column=image_column,
        caption_column=caption_column, vision_encoder=vision_encoder, shard_size=shard_size, overwrite=overwrite,
        features=features, allow_outside_root=allow_outside_root,
    )  # fmt: skip
    state.wait_for_everyone()  # every process looked before any writes
    todo = [i for i in range(state.process_index, len(plan.shards), state.num_processes) if not plan.finished[i]]
    if state.is_main_process:
        plan.start()

    if todo:  # (a rerun over a finished store, or a process without shards, loads no encoder)
        encoder = load_encoder(vision_encoder, state.device)
        if num_workers is None:  # share the CPUs between the processes of this machine
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
            num_workers = min(8, (os.cpu_count() or 1) // local_processes)
        # One flat stream of images across this process's shards keeps the workers and the encoder
        # busy: units of one encoder batch each, decoded by worker processes.
        writer = ShardWriter(plan, todo)
        batches = ImageLoader(plan.preprocessor, max_pixels=max_pixels).batches(
            writer.units(batch_size), batch_size=batch_size, workers=num_workers, processes=True,
            pin_memory=state.device.type == "cuda",
        )  # fmt: skip
        label = "encoding" if state.num_processes == 1 else f"encoding (process {state.process_index})"
        with tqdm(total=writer.images, desc=label, unit="img", position=state.process_index, disable=None) as bar:
            _encode(encoder, plan, batches, batch_size, writer, bar)

    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return plan.finish()


@dataclass
class StorePlan:
    """What the feature store at `out` will hold: the dataset's records in shards of
    `shard_size`, each with the fingerprint of its inputs (`settings`: the encoder, its files and
    preprocessing, the feature kind), and which of them an earlier run finished."""

    source: str | Path
    out: Path
    records: list[CaptionRecord]
    shard_size: int
    settings: dict[str, Any]
    features: str
    row_shape: tuple[int, ...]  # the features of one image
    preprocessor: ImagePreprocessor
    shards: list[list[CaptionRecord]]
    fingerprints: list[str]
    finished: list[bool]

    def start(self) -> None:
        """Say what there is to do (once, on the main process) and mark the store unfinished
        until `finish` writes its manifest again."""
        kept = f"; {sum(self.finished)} finished shards kept" if any(self.finished) else ""
        print(f"{len(self.records)} images in {len(self.shards)} shards{kept}", file=sys.stderr)
        if self.features == "patches":
            print(_store_size(len(self.records), self.row_shape), file=sys.stderr)
        if not all(self.finished):
            (self.out / MANIFEST).unlink(missing_ok=True)

    def finish(self) -> StoreManifest:
        """The store's manifest, written once every shard exists."""
        manifest = StoreManifest(
            encoder=self.settings["encoder"], embed_dim=self.row_shape[-1], preprocessing=self.settings["preprocessing"],
            shard_size=self.shard_size, num_shards=len(self.shards), num_records=len(self.records), num_images=0,
            num_bad=0, source=str(self.source), features=self.features,
            num_patches=self.row_shape[0] if self.features == "patches" else 0,
        )  # fmt: skip
        finish_store(self.out, manifest)
        return manifest


def plan_store(
    source: str | Path,
    out: str | Path,
    *,
    images_root: str | Path | None = None,
    format: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    vision_encoder: str | Path = DEFAULT_VISION_ENCODER,
    shard_size: int = 2048,
    overwrite: bool = False,
    features: str = "pooled",
    allow_outside_root: bool = False,
) -> StorePlan:
    """Read the dataset and the encoder's settings, and look at what `out` holds (see
    `prepare_features`); refuses an `out` that is not a store these inputs may continue or
    replace. Writes nothing."""
    if features not in FEATURE_KINDS:
        raise UserError(f"features must be one of {', '.join(FEATURE_KINDS)}, got {features!r}")
    out = Path(out)
    if is_dataset_object(source):  # its Parquet export is what the store's records point into
        source, allow_outside_root = export_dataset(source), True  # (the caller's own images)
    records = load_records(
        source, format=format, images_root=images_root, image_column=image_column, caption_column=caption_column,
        allow_outside_root=allow_outside_root,
    )  # fmt: skip
    image_processor = load_image_processor(vision_encoder)
    preprocessor = ImagePreprocessor(image_processor)
    spec, _ = load_encoder_config(vision_encoder)
    settings = {"encoder": normalize_model_id(vision_encoder), "preprocessing": preprocessing_of(image_processor)}
    if (encoder_files := source_fingerprint(vision_encoder)) is not None:  # weights saved again at the same path
        settings["encoder_files"] = encoder_files
    row_shape: tuple[int, ...] = (spec.embed_dim,)
    if features == "patches":  # (pooled stores keep the fingerprints they had before patch stores existed)
        settings["features"] = features
        row_shape = (_num_patches(spec, preprocessor, vision_encoder), spec.patch_dim)
    shards = [records[start : start + shard_size] for start in range(0, len(records), shard_size)]
    fingerprints = [shard_fingerprint(settings, shard) for shard in shards]
    finished = [is_finished(out, i, fingerprint) for i, fingerprint in enumerate(fingerprints)]
    if not any(finished):  # nothing here to continue: a new store, or one that replaces what is there
        check_output_dir(out, what="prefixcap feature store", is_ours=is_feature_store, overwrite=overwrite)
    return StorePlan(
        source, out, records, shard_size, settings, features, row_shape, preprocessor, shards, fingerprints, finished
    )


def load_encoder(vision_encoder: str | Path, device: torch.device) -> ImageEncoder:
    """The image encoder, ready to encode on `device`: in float16 on a GPU, float32 elsewhere."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return load_image_encoder(vision_encoder).to(device, dtype).eval()


class ShardWriter:
    """Collects the features of the images of the shards numbered `todo`, one flat sequence of
    images across them, in any order, and writes each shard as soon as its last image is in."""

    def __init__(self, plan: StorePlan, todo: Sequence[int]):
        self.plan = plan
        self.owners = [(number, position) for number in todo for position in range(len(plan.shards[number]))]
        self.images = len(self.owners)
        self.results = {number: ({}, {}) for number in todo}  # number -> (features, failures) by position
        self.remaining = {number: len(plan.shards[number]) for number in todo}

    def units(self, size: int) -> list[list[str]]:
        """The images in units of `size` (the last may be shorter): unit i starts at image i * size."""
        return list(chunked([self.plan.shards[number][position].image for number, position in self.owners], size))

    def add(self, index: int, outcome: torch.Tensor | ImageLoadError) -> None:
        """The features of image `index` (of `plan.row_shape`), or why it has none."""
        number, position = self.owners[index]
        features, failures = self.results[number]
        if isinstance(outcome, ImageLoadError):
            failures[position] = outcome
        else:
            features[position] = outcome
        self.remaining[number] -= 1
        if self.remaining[number] == 0:
            plan = self.plan
            shard = (plan.shards[number], *self.results.pop(number), plan.fingerprints[number], plan.row_shape)
            write_shard(plan.out, number, *shard)


@torch.inference_mode()
def _encode(
    encoder: ImageEncoder, plan: StorePlan, batches: Iterable[Batch], batch_size: int, writer: ShardWriter, bar
) -> None:
    """Encode the `batches` of the writer's units (unit i holds the images from i * batch_size on)."""
    for batch in batches:
        first = batch.unit * batch_size  # the index of the batch's first image
        outcomes: dict[int, torch.Tensor | ImageLoadError] = dict(batch.failures)
        if batch.pixels is not None:
            embeds = embed_pixels(encoder, plan.preprocessor, batch.pixels, patches=len(plan.row_shape) == 2)
            outcomes |= zip(batch.readable, embeds.to(torch.float16).cpu())
        for position in range(len(batch.keys)):
            writer.add(first + position, outcomes[position])
        bar.update(len(batch.keys))


def _num_patches(spec: EncoderSpec, preprocessor: ImagePreprocessor, source: str | Path) -> int:
    """Patch tokens per image: the encoder's grid over the processor's fixed output size."""
    if preprocessor.output_size is None:
        raise UserError(
            f"{source}: its image processor gives inputs of varying size, so images would have varying "
            "numbers of patch tokens; patch features need a fixed-size processor"
        )
    return spec.num_patches(*preprocessor.output_size)


def _store_size(num_images: int, row_shape: tuple[int, ...]) -> str:
    """What the patch store will hold, in words: a COCO-sized store runs to tens of gigabytes."""
    tokens, width = row_shape
    size = num_images * tokens * width * 2  # float16
    return (
        f"patch features: {num_images} images x {tokens} tokens x {width} x 2 bytes = {_human_bytes(size)} "
        "in the store (and in memory when training reads it)"
    )


def _human_bytes(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
