"""The FAISS index of a datastore: inner product over L2-normalised CLIP embeddings (cosine).

    kind   index                   search                                for
    flat   IndexFlatIP             exact                                 up to a few hundred thousand captions
    ivf    IndexIVFFlat            the `nprobe` lists nearest the query  millions: k-means lists, trained once
    hnsw   IndexHNSWFlat           a graph walk, `ef_search` wide        millions: no training, incremental adds

The approximate kinds trade recall for speed, so a store measures theirs (`measure_recall`) against
exact search whenever it is written. This is the only module that imports faiss, after
`require("retrieval")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prefixcap.errors import UserError
from prefixcap.system.extras import require

if TYPE_CHECKING:
    import faiss

INDEX_KINDS = ("flat", "ivf", "hnsw")
DEFAULT_NPROBE = 32
DEFAULT_HNSW_M = 32
DEFAULT_EF_SEARCH = 128
HNSW_EF_CONSTRUCTION = 40  # faiss's default
MIN_POINTS_PER_LIST = 40  # k-means wants at least 39 training points per centroid (faiss warns below)
KMEANS_ITERATIONS = 10
TIE_TOLERANCE = 1e-6  # float32 inner products of one pair of vectors differ by less between index kinds
# Settings far above real use, so that a damaged manifest fails before faiss allocates anything.
MAX_SETTING = 1 << 20


def faiss_module():
    """faiss, or one line naming the extra that installs it."""
    require("retrieval", feature="a caption datastore")
    import faiss

    return faiss


@dataclass(frozen=True)
class IndexSettings:
    """How a store's captions are indexed; `None` settings take their defaults when the index is built."""

    kind: str = "flat"
    nlist: int | None = None  # ivf: number of k-means lists (default: 4 sqrt(n), at least 40 captions per list)
    nprobe: int | None = None  # ivf: lists searched per query
    hnsw_m: int | None = None  # hnsw: links per node
    ef_search: int | None = None  # hnsw: candidates kept during a search

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise UserError(f"unknown index kind {self.kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        used = {"flat": (), "ivf": ("nlist", "nprobe"), "hnsw": ("hnsw_m", "ef_search")}[self.kind]
        for name in ("nlist", "nprobe", "hnsw_m", "ef_search"):
            value = getattr(self, name)
            if value is None:
                continue
            if name not in used:
                raise UserError(f"{name} does not apply to a {self.kind} index")
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SETTING:
                raise UserError(f"{name} must be an integer in [1, {MAX_SETTING}], got {value!r}")

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def resolved(self, count: int) -> IndexSettings:
        """These settings with every default filled in, for a store of `count` captions."""
        if self.kind == "ivf":
            nlist = self.nlist or max(1, min(round(4 * math.sqrt(count)), count // MIN_POINTS_PER_LIST))
            return IndexSettings("ivf", nlist=nlist, nprobe=min(self.nprobe or DEFAULT_NPROBE, nlist))
        if self.kind == "hnsw":
            return IndexSettings(
                "hnsw", hnsw_m=self.hnsw_m or DEFAULT_HNSW_M, ef_search=self.ef_search or DEFAULT_EF_SEARCH
            )
        return self

    def describe(self) -> str:
        if self.kind == "ivf":
            return f"IVF ({self.nlist} lists, {self.nprobe} searched per query)"
        if self.kind == "hnsw":
            return f"HNSW (M {self.hnsw_m}, ef_search {self.ef_search})"
        return "exact inner product"


def build_index(vectors: np.ndarray, settings: IndexSettings, *, seed: int = 0) -> faiss.Index:
    """An index of `vectors` [n, d] (float32, normalised) with resolved `settings`. An IVF index
    trains its lists on a sample of `vectors` (at most 64 per list), with spherical k-means."""
    faiss = faiss_module()
    count, dim = vectors.shape
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = settings.ef_search
    else:
        if settings.nlist > count:
            raise UserError(f"an IVF index of {settings.nlist} lists needs at least that many captions, not {count}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, settings.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # centroids on the unit sphere, as the vectors are
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # small stores: fewer points per list than faiss likes, silently
        sample = min(count, 64 * settings.nlist)
        rows = np.sort(np.random.default_rng(seed).choice(count, sample, replace=False))
        index.train(np.ascontiguousarray(vectors[rows]))
        index.nprobe = settings.nprobe
    add_vectors(index, vectors)
    return index


def add_vectors(index: faiss.Index, vectors: np.ndarray, chunk: int = 65536) -> None:
    """Append `vectors` to `index` in chunks (an IVF index assigns each chunk to its lists)."""
    for start in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32))


def all_vectors(index: faiss.Index) -> np.ndarray:
    """The [n, d] vectors an index holds (all three kinds store them uncompressed)."""
    return index.reconstruct_n(0, index.ntotal)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [q, k] float32, rows [q, k] int64) best first; a row is -1 where fewer than k were found."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def measure_recall(index: faiss.Index, queries: int = 1000, k: int = 10, *, seed: int = 0) -> dict[str, float | int]:
    """recall@k of `index` against exact search: the mean share of each query's exact top k that
    the index returns in its top k. A result counts when it scores at least the exact k-th score,
    so that duplicate captions (equal vectors) tie rather than miss. The queries are a seeded
    sample of the index's own vectors (the store's captions); image queries may see another recall."""
    faiss = faiss_module()
    vectors = all_vectors(index)
    k = min(k, len(vectors))
    chosen = np.sort(np.random.default_rng(seed).choice(len(vectors), min(queries, len(vectors)), replace=False))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    return {"k": int(k), "queries": len(chosen), "recall": recall_against(index, exact, vectors[chosen], k)}


def recall_against(index: faiss.Index, exact: faiss.Index, queries: np.ndarray, k: int) -> float:
    """recall@k of `index` for `queries`, against the exact index `exact` of the same vectors; a
    result counts when it scores at least the exact k-th score (see `measure_recall`)."""
    truth, _ = search(exact, queries, k)
    found, rows = search(index, queries, k)
    return float(((found >= truth[:, -1:] - TIE_TOLERANCE) & (rows >= 0)).sum(axis=1).mean()) / k


def write_index(index: faiss.Index, path: Path) -> None:
    faiss_module().write_index(index, str(path))


def read_index(path: Path, settings: IndexSettings, dim: int, count: int) -> faiss.Index:
    """The index in file `path`, checked against what the manifest says it is: its kind, metric,
    width, size and settings (the caller has verified the file's checksum already)."""
    faiss = faiss_module()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise UserError(f"{path}: damaged FAISS index ({str(error).strip().splitlines()[-1]})") from None
    expected = {"flat": faiss.IndexFlatIP, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}[settings.kind]
    if type(index) is not expected or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UserError(f"{path}: holds a {type(index).__name__}, not the {settings.kind} inner-product index")
    if index.d != dim or index.ntotal != count:
        raise UserError(f"{path}: holds {index.ntotal} {index.d}-d vectors, the manifest says {count} {dim}-d")
    if settings.kind == "ivf":
        found = {"nlist": index.nlist, "nprobe": index.nprobe}
    elif settings.kind == "hnsw":
        found = {"hnsw_m": index.hnsw.nb_neighbors(1), "ef_search": index.hnsw.efSearch}
    else:
        found = {}
    for name, value in found.items():
        if value != getattr(settings, name):
            raise UserError(f"{path}: has {name} {value}, the manifest says {getattr(settings, name)}")
    return index
