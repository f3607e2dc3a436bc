"""Encode every image of a caption dataset once, into a feature store (layout in `features`):
pooled embeddings, or patch tokens (`features="patches"`, for the resampler mapper).

Images are read and preprocessed by DataLoader worker processes while the encoder runs on the
previous batch. Under `accelerate launch` or `torchrun`, shard i is encoded by process
i % num_processes; each process writes only its own shards, and the main process writes the
manifest once all of them exist, so any number of processes gives the same store as one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from prefixcap.data import CaptionRecord, load_records
from prefixcap.data.hf import export_dataset, is_dataset_object
from prefixcap.errors import UserError
from prefixcap.inputs.images import DEFAULT_MAX_PIXELS
from prefixcap.inputs.loader import Batch, ImageLoader, chunked
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.caption_model import embed_pixels
from prefixcap.model.config import DEFAULT_VISION_ENCODER, FEATURE_KINDS, normalize_model_id
from prefixcap.model.encoders import EncoderSpec, load_encoder_config, load_image_encoder, load_image_processor
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
    if features not in FEATURE_KINDS:
        raise UserError(f"features must be one of {', '.join(FEATURE_KINDS)}, got {features!r}")
    state = process_state()
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
    state.wait_for_everyone()  # every process looked before any writes
    todo = [i for i in range(state.process_index, len(shards), state.num_processes) if not finished[i]]
    if state.is_main_process:
        kept = f"; {sum(finished)} finished shards kept" if any(finished) else ""
        print(f"{len(records)} images in {len(shards)} shards{kept}", file=sys.stderr)
        if features == "patches":
            print(_store_size(len(records), row_shape), file=sys.stderr)
        if not all(finished):  # the store is incomplete until the manifest is rewritten at the end
            (out / MANIFEST).unlink(missing_ok=True)

    if todo:  # (a rerun over a finished store, or a process without shards, loads no encoder)
        dtype = torch.float16 if state.device.type == "cuda" else torch.float32
        encoder = load_image_encoder(vision_encoder).to(state.device, dtype).eval()
        if num_workers is None:  # share the CPUs between the processes of this machine
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
            num_workers = min(8, (os.cpu_count() or 1) // local_processes)
        # One flat stream of images across this process's shards keeps the workers and the encoder
        # busy: units of one encoder batch each, decoded by worker processes.
        work = [(i, shards[i], fingerprints[i]) for i in todo]
        units = list(chunked([record.image for _, records, _ in work for record in records], batch_size))
        batches = ImageLoader(preprocessor, max_pixels=max_pixels).batches(
            units, batch_size=batch_size, workers=num_workers, processes=True, pin_memory=state.device.type == "cuda"
        )
        _encode_shards(encoder, preprocessor, batches, batch_size, work, row_shape, out, state)

    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    manifest = StoreManifest(
        encoder=settings["encoder"], embed_dim=row_shape[-1], preprocessing=settings["preprocessing"],
        shard_size=shard_size, num_shards=len(shards), num_records=len(records), num_images=0, num_bad=0,
        source=str(source), features=features, num_patches=row_shape[0] if features == "patches" else 0,
    )  # fmt: skip
    finish_store(out, manifest)
    return manifest


@torch.inference_mode()
def _encode_shards(
    encoder,
    preprocessor: ImagePreprocessor,
    batches: Iterable[Batch],
    batch_size: int,
    shards: list[tuple[int, list[CaptionRecord], str]],
    row_shape: tuple[int, ...],
    out: Path,
    state,
) -> None:
    """Encode the (number, records, fingerprint) `shards`, whose images come in `batches` (unit i
    holds the images from i * batch_size on), and write each shard as soon as its last image is done."""
    owners = [(number, position) for number, records, _ in shards for position in range(len(records))]
    by_number = {number: (records, fingerprint) for number, records, fingerprint in shards}
    results = {number: ({}, {}) for number in by_number}  # number -> (embeds, failures) by position
    remaining = {number: len(records) for number, (records, _) in by_number.items()}
    label = "encoding" if state.num_processes == 1 else f"encoding (process {state.process_index})"
    with tqdm(total=len(owners), desc=label, unit="img", position=state.process_index, disable=None) as bar:
        for batch in batches:
            first = batch.unit * batch_size  # the index of the batch's first image
            # 1. Encode the good images of the batch.
            if batch.pixels is not None:
                embeds = embed_pixels(encoder, preprocessor, batch.pixels, patches=len(row_shape) == 2)
                for index, embed in zip(batch.readable, embeds.to(torch.float16).cpu()):
                    number, position = owners[first + index]
                    results[number][0][position] = embed
            for index, failure in batch.failures.items():
                number, position = owners[first + index]
                results[number][1][position] = failure
            # 2. Write every shard this batch completed.
            for index in range(first, first + len(batch.keys)):
                number = owners[index][0]
                remaining[number] -= 1
                if remaining[number] == 0:
                    records, fingerprint = by_number[number]
                    write_shard(out, number, records, *results.pop(number), fingerprint, row_shape)
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
