"""A caption datastore: captions embedded with a CLIP's text tower, searched by image embeddings.

    DS/
      datastore.json   manifest: the CLIP (name and probes), index settings, recall@k of an
                       approximate index, counts, the caption sources added, each file's size and sha256
      index.faiss      the FAISS index; row i is caption i
      captions.json    [[image_id, [caption, ...]], ...]: each image's captions, in row order

Nothing is pickled. The folder is written whole into a temporary folder beside DS and renamed
into place (`prefixcap.system.atomic.atomic_dir`), by `build` and by every `add`, so a reader sees
the old store or the new one. A reader checks the manifest's every field and each file's size and
checksum before FAISS reads a byte, so a damaged or foreign store is one line, not a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefixcap.data import SPLITS, load_records
from prefixcap.errors import UserError
from prefixcap.model.config import DEFAULT_VISION_ENCODER
from prefixcap.retrieval.encoder import PROBE_AGREEMENT, CaptionEncoder, EncoderRecord
from prefixcap.retrieval.index import (
    IndexSettings,
    add_vectors,
    build_index,
    faiss_module,
    measure_recall,
    read_index,
    search,
    write_index,
)
from prefixcap.system.atomic import atomic_dir, check_output_dir
from prefixcap.system.files import TooLargeError, open_regular, read_regular

MANIFEST = "datastore.json"
INDEX_FILE = "index.faiss"
CAPTIONS_FILE = "captions.json"
FORMAT = "prefixcap datastore"
FORMAT_VERSION = 1
DATASTORE = "prefixcap datastore"
MAX_MANIFEST_BYTES = 1 << 24
RECALL_QUERIES = 1000
RECALL_K = 10
_REBUILD = "rebuild it with `prefixcap datastore build`"


@dataclass(frozen=True)
class Retrieved:
    """One image's retrieved captions, best first, with their cosine scores and their images' ids."""

    captions: tuple[str, ...]
    scores: tuple[float, ...]
    image_ids: tuple[str, ...]


class Datastore:
    """A caption datastore in memory.

    >>> store = Datastore.load("ds/")
    >>> store.check_model(model)                      # one line if the model has another CLIP
    >>> store.search(image_embeds, k=4, exclude=ids)  # [Retrieved, ...], one per image
    """

    def __init__(
        self,
        path: Path,
        encoder: EncoderRecord,
        settings: IndexSettings,
        index: Any,
        groups: Sequence[tuple[str, Sequence[str]]],
        *,
        recall: dict[str, Any] | None = None,
        sources: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.path = Path(path)
        self.encoder = encoder
        self.settings = settings
        self.index = index
        self.recall = recall  # {"k", "queries", "recall"} for an approximate index, measured when written
        self.sources = list(sources)
        self.image_ids = [image_id for image_id, _ in groups]
        self.captions = [caption for _, captions in groups for caption in captions]
        self.counts = np.array([len(captions) for _, captions in groups], dtype=np.int64)  # captions per image
        self.image_of_row = np.repeat(np.arange(len(groups)), self.counts)
        self._image_index = {image_id: number for number, image_id in enumerate(self.image_ids)}
        self._counts: Counter[str] | None = None  # how often each caption text occurs, when first needed
        # what the files hold (a digest of their checksums): set when the store is read or written
        self.fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def groups(self) -> list[tuple[str, list[str]]]:
        """(image_id, captions) per image, in row order."""
        ends = np.cumsum(self.counts)
        return [
            (image_id, self.captions[end - count : end])
            for image_id, end, count in zip(self.image_ids, ends, self.counts)
        ]

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        path = Path(path)
        manifest = _read_manifest(path)
        encoder = EncoderRecord.from_dict(manifest["encoder"], str(path / MANIFEST))
        settings = _settings(manifest["index"], path / MANIFEST)
        groups = _read_captions(path, manifest)
        _check_file(path, INDEX_FILE, manifest["files"][INDEX_FILE])
        index = read_index(path / INDEX_FILE, settings, encoder.embed_dim, manifest["num_captions"])
        store = cls(path, encoder, settings, index, groups, recall=manifest["recall"], sources=manifest["sources"])
        store.fingerprint = _fingerprint(manifest["files"])
        return store

    # ------------------------------------------------------------------ searching
    def holds_image(self, image_id: str) -> bool:
        return image_id in self._image_index

    def search(
        self,
        image_embeds: torch.Tensor | np.ndarray,
        k: int,
        *,
        exclude: Sequence[str | None] | None = None,
        exclude_captions: Sequence[Collection[str]] | None = None,
    ) -> list[Retrieved]:
        """The `k` captions nearest each image embedding [B, D] (any scale: they are normalised),
        by cosine. `exclude` gives one image id (or None) per image whose captions that image
        may not retrieve: its own, during training. `exclude_captions` gives per image caption
        texts it may not retrieve wherever they are (its own, when the store knows it by no id).
        Fewer than `k` come back only when the store (or an approximate index's searched part)
        holds fewer."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = self._queries(image_embeds)
        for name, given in (("exclude", exclude), ("exclude_captions", exclude_captions)):
            if given is not None and len(given) != len(queries):
                raise ValueError(f"{name} gives {len(given)} entries for {len(queries)} images")
        # each query's excluded image, as its number (-1: none, or an image the store does not hold)
        given = exclude if exclude is not None else [None] * len(queries)
        excluded = np.array([self._image_index.get(image_id, -1) for image_id in given], dtype=np.int64)
        banned = [set(texts) for texts in exclude_captions] if exclude_captions is not None else None
        # Excluded captions can take at most as many of the top places as the store holds of them.
        extra = int(self.counts[excluded[excluded >= 0]].max(initial=0))
        if banned is not None:
            counts = self._caption_counts()
            extra += max((sum(counts.get(text, 0) for text in texts) for texts in banned), default=0)
        scores, rows = search(self.index, queries, min(k + extra, len(self)))
        images = np.where(rows >= 0, self.image_of_row[np.maximum(rows, 0)], -2)
        keep = (rows >= 0) & (images != excluded[:, None])
        if banned is not None:
            for query, texts in enumerate(banned):
                if texts:
                    keep[query] &= [row < 0 or self.captions[row] not in texts for row in rows[query]]
        results = []
        for row_scores, row_rows, row_keep in zip(scores, rows, keep):
            chosen, chosen_scores = row_rows[row_keep][:k], row_scores[row_keep][:k]
            results.append(
                Retrieved(
                    tuple(self.captions[row] for row in chosen),
                    tuple(float(score) for score in chosen_scores),
                    tuple(self.image_ids[self.image_of_row[row]] for row in chosen),
                )
            )
        return results

    def _caption_counts(self) -> Counter[str]:
        if self._counts is None:
            self._counts = Counter(self.captions)
        return self._counts

    def _queries(self, image_embeds: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(image_embeds, torch.Tensor):
            image_embeds = image_embeds.detach().float().cpu().numpy()
        queries = np.asarray(image_embeds, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.encoder.embed_dim:
            raise UserError(
                f"{self.path}: image embeddings of shape {tuple(queries.shape)} cannot search this datastore "
                f"of {self.encoder.embed_dim}-d CLIP embeddings ({self.encoder.name})"
            )
        if not np.isfinite(queries).all():
            raise UserError(f"{self.path}: image embeddings with non-finite values cannot be searched")
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        return queries / np.maximum(norms, 1e-12)

    def check_model(self, model: Any) -> None:
        """Refuse, in one line, a caption model (`CaptionModel`) whose image embeddings live in
        another space than this store's captions: another encoder, or another CLIP."""
        reason = self.encoder.mismatch(model)
        if reason is not None:
            theirs = model.config.vision_encoder
            raise UserError(
                f"{self.path}: this datastore's captions were embedded with CLIP {self.encoder.name}, but the "
                f"model's image encoder ({theirs}) {reason}; build a datastore for this model with "
                f"`prefixcap datastore build CAPTIONS --out DS --encoder {theirs}`"
            )

    # ------------------------------------------------------------------ writing
    def save(self) -> None:
        """Write the store to `self.path`, whole, replacing what is there (a store: callers check)."""
        with atomic_dir(self.path) as staging:
            write_index(self.index, staging / INDEX_FILE)
            captions = json.dumps(self.groups(), ensure_ascii=False, separators=(",", ":"))
            (staging / CAPTIONS_FILE).write_text(captions, encoding="utf-8")
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "encoder": self.encoder.to_dict(),
                "index": {"kind": self.settings.kind, **_used_settings(self.settings)},
                "recall": self.recall,
                "num_images": self.num_images,
                "num_captions": len(self),
                "sources": self.sources,
                "files": {name: _file_entry(staging / name) for name in (INDEX_FILE, CAPTIONS_FILE)},
            }
            self.fingerprint = _fingerprint(manifest["files"])
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- building and adding
def build_datastore(
    source: Any,
    out: str | Path,
    *,
    encoder: str | Path = DEFAULT_VISION_ENCODER,
    index: IndexSettings | None = None,
    splits: Sequence[str] | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    recall_queries: int = RECALL_QUERIES,
    **read_options: Any,
) -> Datastore:
    """Embed the captions of `source` (anything `load_records` reads; `read_options` are its
    keywords, `splits` the splits to take, default all) with the CLIP `encoder` and write a
    datastore to `out`, which must be new, empty, or (with `overwrite`) a datastore."""
    faiss_module()  # a missing extra fails before any work
    out = Path(out)
    check_output_dir(out, what=DATASTORE, is_ours=is_datastore, overwrite=overwrite)
    groups, origin = _caption_groups(source, splits, read_options)
    caption_encoder = CaptionEncoder.from_pretrained(encoder, device=device, batch_size=batch_size)
    vectors = caption_encoder.embed([caption for _, captions in groups for caption in captions], progress=True)
    settings = (index or IndexSettings()).resolved(len(vectors))
    faiss_index = build_index(vectors, settings)
    store = Datastore(out, caption_encoder.record(), settings, faiss_index, groups, sources=[origin])
    store.recall = _recall(store, recall_queries)
    store.save()
    return store


def add_to_datastore(
    path: str | Path,
    source: Any,
    *,
    encoder: str | Path | None = None,
    splits: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    recall_queries: int = RECALL_QUERIES,
    **read_options: Any,
) -> Datastore:
    """Append the captions of `source` to the datastore at `path` (rewritten whole, atomically).
    They are embedded with the store's CLIP: the one it names, or `encoder` when that has moved,
    which must compute what the store recorded. Images already in the store are refused."""
    store = Datastore.load(path)
    groups, origin = _caption_groups(source, splits, read_options)
    known = next((image_id for image_id, _ in groups if image_id in store._image_index), None)
    if known is not None:
        raise UserError(f"{origin['source']}: image {known!r} is in the datastore {path} already")
    caption_encoder = CaptionEncoder.from_pretrained(
        encoder or store.encoder.name, device=device, batch_size=batch_size
    )
    agreement = store.encoder.agreement(caption_encoder.record())
    if agreement < PROBE_AGREEMENT:
        raise UserError(
            f"{path}: this datastore was built with CLIP {store.encoder.name}; {caption_encoder.name} is another "
            f"CLIP (probe cosine {agreement:.3f}), whose embeddings cannot be searched together with these"
        )
    vectors = caption_encoder.embed([caption for _, captions in groups for caption in captions], progress=True)
    add_vectors(store.index, vectors)
    grown = Datastore(
        store.path, store.encoder, store.settings, store.index, store.groups() + groups,
        sources=[*store.sources, origin],
    )  # fmt: skip
    grown.recall = _recall(grown, recall_queries)
    grown.save()
    return grown


def is_datastore(path: Path) -> bool:
    """Whether `path` holds a datastore manifest (so that `build --overwrite` may replace it)."""
    try:
        return _read_manifest(path)["format"] == FORMAT
    except UserError:
        return False


def _caption_groups(
    source: Any, splits: Sequence[str] | None, read_options: dict[str, Any]
) -> tuple[list[tuple[str, list[str]]], dict[str, Any]]:
    """(image_id, captions) of the records of `source` in `splits` (default all), and a summary
    of what was taken for the manifest's `sources`."""
    for split in splits or ():
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    records = [r for r in load_records(source, **read_options) if splits is None or r.split in splits]
    if not records:
        raise UserError(f"{name}: no captioned images in split {' or '.join(splits or SPLITS)}")
    groups = [(record.image_id, list(record.captions)) for record in records]
    counts = {split: sum(r.split == split for r in records) for split in SPLITS}
    origin = {
        "source": name,
        "images": len(groups),
        "captions": sum(len(captions) for _, captions in groups),
        "splits": {split: count for split, count in counts.items() if count},
    }
    return groups, origin


def _recall(store: Datastore, queries: int) -> dict[str, Any] | None:
    """recall@k against exact search for an approximate index (None for an exact one)."""
    return None if store.settings.exact else measure_recall(store.index, queries, min(RECALL_K, len(store)))


# ---------------------------------------------------------------------- the manifest and its files
_MANIFEST_KEYS = {
    "format", "format_version", "encoder", "index", "recall", "num_images", "num_captions", "sources", "files",
}  # fmt: skip


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at `path`, with every field but the encoder and the index checked."""
    where = path / MANIFEST
    if not path.is_dir():
        raise UserError(f"{path}: no such datastore folder")
    if not where.exists():
        raise UserError(f"{path}: not a prefixcap datastore (no {MANIFEST})")
    data = _read_regular(where, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise UserError(f"{where}: not a prefixcap datastore manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{where}: not a prefixcap datastore manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{where}: datastore format {manifest.get('format_version')!r}, this prefixcap reads {FORMAT_VERSION}"
        )
    if set(manifest) != _MANIFEST_KEYS:
        raise UserError(f"{where}: damaged manifest (fields {sorted(set(manifest) ^ _MANIFEST_KEYS)}); {_REBUILD}")
    for key in ("num_images", "num_captions"):
        value = manifest[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")
    files = manifest["files"]
    if not (
        isinstance(files, dict) and set(files) == {INDEX_FILE, CAPTIONS_FILE} and all(map(_is_entry, files.values()))
    ):
        raise UserError(f"{where}: files must give the bytes and sha256 of {INDEX_FILE} and {CAPTIONS_FILE}")
    if not (isinstance(manifest["sources"], list) and all(isinstance(s, dict) for s in manifest["sources"])):
        raise UserError(f"{where}: sources must be a list of objects")
    recall = manifest["recall"]
    if recall is not None and not (
        isinstance(recall, dict) and set(recall) == {"k", "queries", "recall"}
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in recall.values())
    ):  # fmt: skip
        raise UserError(f"{where}: recall must be null or {{k, queries, recall}}")
    return manifest


def _settings(values: Any, where: Path) -> IndexSettings:
    names = {"kind", "nlist", "nprobe", "hnsw_m", "ef_search"}
    if not isinstance(values, dict) or not set(values) <= names or not isinstance(values.get("kind"), str):
        raise UserError(f"{where}: index must name its kind and settings")
    try:
        settings = IndexSettings(**values)
    except UserError as error:
        raise UserError(f"{where}: index: {error}") from None
    if any(value is None for value in _used_settings(settings).values()):
        raise UserError(f"{where}: index: a {settings.kind} index must record all its settings")
    return settings


def _used_settings(settings: IndexSettings) -> dict[str, int | None]:
    names = {"flat": (), "ivf": ("nlist", "nprobe"), "hnsw": ("hnsw_m", "ef_search")}[settings.kind]
    return {name: getattr(settings, name) for name in names}


def _read_captions(path: Path, manifest: dict[str, Any]) -> list[tuple[str, list[str]]]:
    where = path / CAPTIONS_FILE
    data = _check_file(path, CAPTIONS_FILE, manifest["files"][CAPTIONS_FILE], keep=True)
    try:
        groups = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise UserError(f"{where}: not valid UTF-8 JSON ({error}); {_REBUILD}") from None
    valid = isinstance(groups, list) and all(
        isinstance(group, list) and len(group) == 2 and isinstance(group[0], str) and isinstance(group[1], list)
        and group[1] and all(isinstance(caption, str) for caption in group[1])
        for group in groups
    )  # fmt: skip
    if not valid:
        raise UserError(f"{where}: expected [[image_id, [caption, ...]], ...]; {_REBUILD}")
    counts = (len(groups), sum(len(captions) for _, captions in groups))
    if counts != (manifest["num_images"], manifest["num_captions"]):
        raise UserError(
            f"{where}: holds {counts[0]} images and {counts[1]} captions, the manifest disagrees; {_REBUILD}"
        )
    if len({image_id for image_id, _ in groups}) != len(groups):
        raise UserError(f"{where}: an image id appears twice; {_REBUILD}")
    return [(image_id, captions) for image_id, captions in groups]


def _check_file(path: Path, name: str, entry: dict[str, Any], *, keep: bool = False) -> bytes:
    """Check that the store's file `name` has the size and sha256 of the manifest's `entry`,
    reading it in chunks; its bytes if `keep`, else b"" (the index: FAISS reads it next)."""
    where = path / name
    if not where.exists():
        raise UserError(f"{where}: missing; the datastore is damaged; {_REBUILD}")
    digest, size, data = hashlib.sha256(), 0, []
    try:
        file = open_regular(where, follow_links=False)
    except OSError as error:
        raise UserError(f"{where}: cannot read ({error.strerror or error}; a datastore holds no links)") from None
    with file:
        found = os.fstat(file.fileno()).st_size
        if found != entry["bytes"]:
            raise UserError(
                f"{where}: {found} bytes, the manifest says {entry['bytes']}; the datastore is damaged; {_REBUILD}"
            )
        while chunk := file.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
            if keep:
                data.append(chunk)
    if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
        raise UserError(f"{where}: checksum mismatch; the datastore is damaged; {_REBUILD}")
    return b"".join(data)


def _read_regular(path: Path, limit: int) -> bytes:
    """A store file's bytes: a regular file, never a link (a datastore holds none), of at most `limit`."""
    try:
        return read_regular(path, limit, follow_links=False)
    except TooLargeError:
        raise UserError(f"{path}: over {limit} bytes; not a datastore manifest") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error}; a datastore holds no links)") from None


def _file_entry(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fingerprint(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _is_entry(entry: Any) -> bool:
    """A manifest's `files` entry: {"bytes": size, "sha256": hex digest}."""
    return (
        isinstance(entry, dict) and set(entry) == {"bytes", "sha256"}
        and _is_size(entry["bytes"]) and _is_digest(entry["sha256"])
    )  # fmt: skip


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
