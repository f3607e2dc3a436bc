"""The feature store: every image of a dataset encoded once by the frozen image encoder.

Training and evaluation read fp16 features from here instead of re-running the encoder on every
image at every epoch: pooled embeddings [n, embed_dim] (for the linear, MLP and transformer
mappers), or patch tokens [n, num_patches, embed_dim] (for the resampler; `prepare --features
patches`). Layout (like clip-retrieval: tensor shards plus row metadata):

    FEATURES/
      store.json                 manifest: encoder id, feature kind and sizes, preprocessing, counts
      shards/000000.safetensors  "image_embeds" [n, embed_dim] (or [n, num_patches, embed_dim])
                                 float16, one row per good image
      shards/000000.jsonl        one line per record of the shard: image_id, image, split,
                                 captions, prompt (if any), and "row" (its embedding row) or "error" (bad image)
      bad_images.jsonl           every image that could not be read, with the reason

Shard i holds records [i * shard_size, (i + 1) * shard_size) of the dataset's deterministic record
order. Each shard file is written atomically, its `.jsonl` first and its `.safetensors` last, and
the latter records a fingerprint of its inputs and a digest of the `.jsonl`: a shard whose
`.safetensors` exists with the current fingerprint and a matching `.jsonl` is finished, so a killed
`prepare` resumes where it stopped. `store.json` is written last, by one process, once every shard
exists: a store with a manifest is complete. A reader checks every shard against it (record and
row counts, embedding shapes, the `.jsonl` digest) before trusting any, so a damaged store is a
one-line error naming the file, never a wrong training set.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prefixcap.data import CaptionRecord
from prefixcap.errors import ImageLoadError, UserError
from prefixcap.model.config import FEATURE_KINDS, CaptionConfig, normalize_model_id
from prefixcap.system.atomic import atomic_path, holds_only, write_atomic

MANIFEST = "store.json"
BAD_IMAGES = "bad_images.jsonl"
SHARD_DIR = "shards"
EMBEDS_KEY = "image_embeds"
INDEX_DIGEST = "index_sha256"  # .safetensors metadata: the sha256 of the shard's .jsonl
FORMAT_VERSION = 1
RERUN = "the feature store is damaged; rerun `prefixcap prepare`"
# The image processor settings that change pixels; other keys (class names) may differ harmlessly.
PREPROCESSING_KEYS = (
    "do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size",
    "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
)  # fmt: skip


@dataclass
class StoreManifest:
    encoder: str  # the vision encoder the embeddings came from: hub id or absolute directory
    embed_dim: int  # size of each pooled embedding, or of each patch token
    preprocessing: dict[str, Any]  # the encoder's image processor settings (PREPROCESSING_KEYS)
    shard_size: int  # records per shard (the last shard may hold fewer)
    num_shards: int
    num_records: int  # images the dataset lists
    num_images: int  # images encoded: num_records minus the bad ones
    num_bad: int  # unreadable images, listed in bad_images.jsonl
    splits: dict[str, int] = field(default_factory=dict)  # encoded images per split
    source: str = ""  # the dataset prepare read
    dtype: str = "float16"  # dtype of the stored embeddings
    features: str = "pooled"  # FEATURE_KINDS: what each row holds
    num_patches: int = 0  # patch tokens per image (features "patches"; 0 for pooled)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one image's features."""
        return (self.num_patches, self.embed_dim) if self.features == "patches" else (self.embed_dim,)

    format_version: int = FORMAT_VERSION


# ---------------------------------------------------------------------- reading
class FeatureStore:
    """A finished feature store, read-only.

    >>> store = FeatureStore("features/coco")
    >>> store.check_encoder(model.config)            # UserError if the model expects other features
    >>> records, embeds = store.records("val"), store.embeddings("val")   # row i <-> records[i]
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        # (shard, row in shard, record) for every encoded image, in dataset order.
        self._index: list[tuple[int, int, CaptionRecord]] = []
        fingerprints = []
        for shard in range(self.manifest.num_shards):
            entries, fingerprint = _checked_shard(self.path, shard, self.manifest)
            fingerprints.append(fingerprint)
            self._index += [(shard, entry["row"], _record(entry)) for entry in entries if "row" in entry]
        _check_totals(self.path / MANIFEST, self.manifest, [record for _, _, record in self._index])
        # The shards' fingerprints cover the encoder settings and every record, so they name the content.
        self.identity = hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest()

    @property
    def encoder(self) -> str:
        return self.manifest.encoder

    @property
    def embed_dim(self) -> int:
        return self.manifest.embed_dim

    def __len__(self) -> int:
        return len(self._index)

    def records(self, split: str | None = None) -> list[CaptionRecord]:
        """The encoded images (all, or one split's) in dataset order."""
        return [record for _, _, record in self._select(split)]

    def embeddings(self, split: str | None = None, *, mmap: bool = False) -> torch.Tensor | MappedRows:
        """float16 [len(records(split)), embed_dim] ([..., num_patches, embed_dim] for patch
        features); row i belongs to records(split)[i]. Loads the selected rows into memory (COCO:
        123k images, 126 MB pooled; 9 GB of ViT-B/32 patch tokens), or with `mmap` maps the shards
        instead and reads rows when indexed (`MappedRows`), so that a patch store larger than
        memory trains."""
        if mmap:
            selected = self._select(split)
            shards = np.array([shard for shard, _, _ in selected], dtype=np.int64)
            rows = np.array([row for _, row, _ in selected], dtype=np.int64)
            paths = [shard_path(self.path, shard, ".safetensors") for shard in range(self.manifest.num_shards)]
            return MappedRows(paths, shards, rows, self.manifest.row_shape)
        rows_by_shard: dict[int, list[int]] = {}
        for shard, row, _ in self._select(split):
            rows_by_shard.setdefault(shard, []).append(row)
        parts = [torch.empty(0, *self.manifest.row_shape, dtype=torch.float16)]
        for shard, rows in rows_by_shard.items():
            with _open_shard(shard_path(self.path, shard, ".safetensors")) as file:
                parts.append(file.get_tensor(EMBEDS_KEY)[rows])
        return torch.cat(parts)

    def check_encoder(self, config: CaptionConfig, image_processor: Any = None) -> None:
        """Raise UserError unless a model with `config` (and `image_processor`) expects exactly
        these features: the same kind (pooled or patches), encoder, embedding size and, if given,
        preprocessing."""
        where = f"{self.path}: features from {self.encoder!r}"
        wanted = "patches" if config.uses_patches else "pooled"
        if self.manifest.features != wanted:
            fix = (
                f"prepare the store with `prefixcap prepare ... --features {wanted}`"
                if config.uses_patches
                else "train with --mapper resampler, or prepare the store with `--features pooled`"
            )
            raise UserError(
                f"{self.path} holds {_KIND_NAMES[self.manifest.features]}, but the {config.mapper} mapper reads "
                f"{_KIND_NAMES[wanted]}; {fix}"
            )
        if config.embed_dim != self.embed_dim:
            raise UserError(f"{where} are {self.embed_dim}-d, but the model's mapper expects {config.embed_dim}-d")
        if normalize_model_id(config.vision_encoder) != self.encoder:
            raise UserError(f"{where}, but the model uses {config.vision_encoder!r}; prepare features with its encoder")
        if image_processor is not None and preprocessing_of(image_processor) != self.manifest.preprocessing:
            raise UserError(f"{where} used other image preprocessing than the model's image processor")

    def _select(self, split: str | None) -> list[tuple[int, int, CaptionRecord]]:
        if split is not None and split not in self.manifest.splits:
            raise UserError(f"{self.path}: no images in split {split!r} (splits: {', '.join(self.manifest.splits)})")
        return [item for item in self._index if split is None or item[2].split == split]


class MappedRows:
    """Some rows of a feature store, memory-mapped from its shards: indexing with a slice, an index
    tensor, array or list gives a float16 tensor of those rows, read from disk (or the page cache)
    then. Enough of a tensor for the training and evaluation loops, which only index it."""

    def __init__(self, paths: Sequence[Path], shards: np.ndarray, rows: np.ndarray, row_shape: tuple[int, ...]):
        self.row_shape = row_shape
        self.shard_of, self.row_of = shards, rows  # row i is row row_of[i] of shard shard_of[i]
        self.arrays = {shard: _map_embeds(paths[shard]) for shard in np.unique(shards).tolist()}

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.row_of), *self.row_shape))

    dtype = torch.float16

    def __len__(self) -> int:
        return len(self.row_of)

    def __getitem__(self, index: slice | torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        if isinstance(index, slice):
            positions = np.arange(len(self))[index]
        else:
            positions = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        shards, rows = self.shard_of[positions], self.row_of[positions]
        out = np.empty((len(positions), *self.row_shape), dtype=np.float16)
        for shard in np.unique(shards).tolist():
            chosen = shards == shard
            out[chosen] = self.arrays[shard][rows[chosen]]
        return torch.from_numpy(out)


def _map_embeds(path: Path) -> np.ndarray:
    """The embeddings tensor of a shard, memory-mapped read-only (safetensors: an 8-byte header
    length, a JSON header giving each tensor's dtype, shape and byte range, then the data)."""
    try:
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            entry = json.loads(file.read(length))[EMBEDS_KEY]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if entry["dtype"] != "F16" or end - begin != 2 * math.prod(shape):
            raise ValueError(f"{entry['dtype']} {shape} in {end - begin} bytes")
        if not begin < end:
            return np.empty(shape, dtype=np.float16)
        return np.memmap(path, dtype=np.float16, mode="r", offset=8 + length + begin, shape=shape)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: unreadable embeddings ({error}); {RERUN}") from None


_KIND_NAMES = {"pooled": "pooled embeddings", "patches": "patch tokens"}


def read_manifest(path: Path) -> StoreManifest:
    manifest = path / MANIFEST
    if not manifest.is_file():
        hint = (
            "an interrupted `prefixcap prepare`; rerun it to finish"
            if (path / SHARD_DIR).is_dir()
            else "run `prefixcap prepare`"
        )
        raise UserError(f"{path}: not a finished feature store (no {MANIFEST}; {hint})")
    try:
        values = json.loads(manifest.read_text(encoding="utf-8"))
        result = StoreManifest(**values)
        counts_agree = (
            result.shard_size >= 1
            and result.num_shards == math.ceil(result.num_records / result.shard_size)
            and result.num_images + result.num_bad == result.num_records
        )
        kind_agrees = result.features in FEATURE_KINDS and (result.features == "patches") == (result.num_patches > 0)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
        raise UserError(f"{manifest}: not a prefixcap feature manifest ({error})") from None
    if not kind_agrees:
        raise UserError(f"{manifest}: unknown features {result.features!r} with num_patches {result.num_patches}")
    if result.format_version != FORMAT_VERSION:
        raise UserError(f"{manifest}: store format {result.format_version}, this prefixcap reads {FORMAT_VERSION}")
    if not counts_agree:
        raise UserError(f"{manifest}: its shard and image counts disagree; {RERUN}")
    return result


def read_shard_index(path: Path, shard: int) -> list[dict[str, Any]]:
    """The entries of one shard's `.jsonl`; a damaged line is an error naming the file and line."""
    return _read_index(shard_path(path, shard, ".jsonl"))[0]


def _read_index(index: Path) -> tuple[list[dict[str, Any]], str]:
    """(entries, sha256 of the file) of a shard's `.jsonl`, read once."""
    try:
        data = index.read_bytes()
        lines = data.decode("utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{index}: missing; {RERUN}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{index}: unreadable ({error}); {RERUN}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            _record(entry)  # raises unless every field is there
            if "row" not in entry and "error" not in entry:  # an embedding row, or why the image has none
                raise KeyError("row")
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            reason = f"{type(error).__name__}: {error}"
            raise UserError(f"{index}:{number}: not a feature store entry ({reason}); {RERUN}") from None
        entries.append(entry)
    return entries, _digest(data)


def _checked_shard(path: Path, shard: int, manifest: StoreManifest) -> tuple[list[dict[str, Any]], str]:
    """(entries, fingerprint) of one shard, once its index and embeddings agree with each other and
    with the manifest: a cut or damaged shard must fail here, not train on part of the data."""
    index, embeds = shard_path(path, shard, ".jsonl"), shard_path(path, shard, ".safetensors")
    entries, digest = _read_index(index)
    expected = min(manifest.shard_size, manifest.num_records - shard * manifest.shard_size)
    if len(entries) != expected:
        raise UserError(f"{index}: {len(entries)} records, but {MANIFEST} says the shard holds {expected}; {RERUN}")
    rows = [entry["row"] for entry in entries if "row" in entry]
    if rows != list(range(len(rows))):
        raise UserError(f"{index}: its embedding rows are not 0..{len(rows) - 1} in order; {RERUN}")
    with _open_shard(embeds) as file:
        metadata = file.metadata() or {}
        shape = file.get_slice(EMBEDS_KEY).get_shape() if EMBEDS_KEY in file.keys() else None
    if shape != [len(rows), *manifest.row_shape]:
        raise UserError(
            f"{embeds}: holds embeddings of shape {shape}, but its index lists {len(rows)} images "
            f"of {'x'.join(map(str, manifest.row_shape))} features; {RERUN}"
        )
    if metadata.get(INDEX_DIGEST) not in (None, digest):
        raise UserError(f"{index}: changed since `prefixcap prepare` wrote it (unlike {embeds.name}); {RERUN}")
    return entries, metadata.get("fingerprint", "")


def _check_totals(manifest_path: Path, manifest: StoreManifest, records: Sequence[CaptionRecord]) -> None:
    """The shards together must hold the images `store.json` counts, split by split."""
    splits = dict(sorted(Counter(record.split for record in records).items()))
    if len(records) != manifest.num_images or splits != manifest.splits:
        raise UserError(
            f"{manifest_path}: lists {manifest.num_images} images ({manifest.splits}), but the shards hold "
            f"{len(records)} ({splits}); {RERUN}"
        )


@contextmanager
def _open_shard(path: Path) -> Iterator[Any]:
    """`safe_open` on a shard's embeddings; a missing, cut or damaged file is a one-line error."""
    try:
        with safe_open(path, framework="pt") as file:
            yield file
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: unreadable ({error}); {RERUN}") from None


def _record(entry: dict[str, Any]) -> CaptionRecord:
    return CaptionRecord.from_dict(entry)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _index_intact(index: Path, metadata: dict[str, str]) -> bool:
    """Whether a shard's `.jsonl` is the one its `.safetensors` was written with (stores from
    before the digest existed carry none, and are trusted)."""
    return metadata.get(INDEX_DIGEST) in (None, _digest(index.read_bytes()))


def is_feature_store(path: Path) -> bool:
    """Whether `path` holds nothing but a feature store's files (finished or not), so that
    `prepare` may write into it."""
    return holds_only(path, (MANIFEST, BAD_IMAGES, SHARD_DIR))


# ---------------------------------------------------------------------- writing
def shard_path(store: Path, shard: int, suffix: str) -> Path:
    return store / SHARD_DIR / f"{shard:06d}{suffix}"


def preprocessing_of(image_processor: Any) -> dict[str, Any]:
    """The pixel-relevant settings of an image processor, JSON-normalised (enums to ints)."""
    settings = json.loads(image_processor.to_json_string())
    return {key: settings[key] for key in PREPROCESSING_KEYS if key in settings}


def shard_fingerprint(settings: dict[str, Any], records: Sequence[CaptionRecord]) -> str:
    """A digest of everything a shard's content depends on: the encoder settings and its records."""
    payload = json.dumps([settings, [record.to_dict() for record in records]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def is_finished(store: Path, shard: int, fingerprint: str) -> bool:
    """Whether shard `shard` was written completely, from the same inputs, and is intact (a damaged
    shard is encoded again)."""
    embeds, index = shard_path(store, shard, ".safetensors"), shard_path(store, shard, ".jsonl")
    if not (embeds.is_file() and index.is_file()):
        return False
    try:
        with safe_open(embeds, framework="pt") as file:
            metadata = file.metadata() or {}
    except SafetensorError:
        return False
    return metadata.get("fingerprint") == fingerprint and _index_intact(index, metadata)


def write_shard(
    store: Path,
    shard: int,
    records: Sequence[CaptionRecord],
    embeds: dict[int, torch.Tensor],
    failures: dict[int, ImageLoadError],
    fingerprint: str,
    row_shape: tuple[int, ...],
) -> None:
    """Write one shard atomically; `embeds`/`failures` map a record's position in `records` to its
    features (of `row_shape`) or to why it could not be read (stored as the reason alone)."""
    rows, entries = [], []
    for position, record in enumerate(records):
        entry: dict[str, Any] = record.to_dict()
        if position in embeds:
            entry["row"] = len(rows)
            rows.append(embeds[position])
        else:
            entry["error"] = failures[position].reason
        entries.append(entry)
    tensor = torch.stack(rows) if rows else torch.empty(0, *row_shape)
    index = shard_path(store, shard, ".jsonl")
    text = _jsonl(entries)
    write_atomic(index, text)
    # The .safetensors comes last: its presence, with this fingerprint, marks the shard finished.
    metadata = {"fingerprint": fingerprint, INDEX_DIGEST: _digest(text.encode("utf-8"))}
    with atomic_path(shard_path(store, shard, ".safetensors")) as staging:
        save_file({EMBEDS_KEY: tensor.to(torch.float16).contiguous()}, staging, metadata=metadata)


def finish_store(store: Path, manifest: StoreManifest) -> None:
    """Collect the shards' bad images and counts into `bad_images.jsonl` and `store.json`."""
    bad, splits = [], Counter()
    for shard in range(manifest.num_shards):
        for entry in read_shard_index(store, shard):
            if "row" in entry:
                splits[entry["split"]] += 1
            else:
                bad.append({"image_id": entry["image_id"], "image": entry["image"], "reason": entry["error"]})
    manifest.num_bad = len(bad)
    manifest.num_images = manifest.num_records - len(bad)
    manifest.splits = dict(sorted(splits.items()))
    write_atomic(store / BAD_IMAGES, _jsonl(bad))
    _remove_stale_shards(store, manifest.num_shards)
    write_atomic(store / MANIFEST, json.dumps(asdict(manifest), indent=2) + "\n")


def _remove_stale_shards(store: Path, num_shards: int) -> None:
    """Drop shards numbered past the end, left by an earlier run over a larger dataset."""
    for path in (store / SHARD_DIR).glob("*.*"):
        if path.suffix in (".jsonl", ".safetensors") and path.stem.isdigit() and int(path.stem) >= num_shards:
            path.unlink()


def _jsonl(entries: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries)
