"""Object-store inputs for Ray jobs: `s3://` and `gs://` objects, folders (prefixes) and globs,
listed and read through pyarrow's file systems, so that every node reads its share of the
images itself (with its own credentials: the AWS or Google environment pyarrow reads).

pyarrow's URI options follow the URL (`s3://bucket/images/?endpoint_override=HOST:PORT&scheme=http`
for an S3-compatible store); they stay part of every object's name. An object is an image, a
WebDataset shard (each image member, streamed) or a Parquet file (each row's image cell). Names
found in a store are data: only ever read through the store's file system, never as URLs or
commands.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.expand import expand_inputs
from prefixcap.inputs.hf_datasets import IMAGE_COLUMNS, pick_column
from prefixcap.inputs.images import IMAGE_EXTENSIONS
from prefixcap.inputs.sources import Source, StoredImage, file_identity
from prefixcap.system.extras import require

STORE_SCHEMES = ("s3://", "gs://", "gcs://")
MAX_OBJECT_BYTES = 256 * 2**20  # an image object (or a tar member) larger than this is refused unread
_SUFFIXES = (*IMAGE_EXTENSIONS, ".tar", ".parquet")


class StoreObject(StoredImage):
    """An object in an object store (`s3://bucket/key[?options]`), read by `read_store_object`.
    A `StoredImage` to `as_source` and the job plans (which keep typed names as they are): never
    opened as a local file, a URL or a command."""


def is_store_url(name: str) -> bool:
    return name.startswith(STORE_SCHEMES) and not os.path.lexists(name)


def expand_ray_inputs(
    patterns: Sequence[str], *, image_column: str | None = None
) -> tuple[list[Source], list[tuple[str, str]]]:
    """`expand_inputs` for Ray jobs: also object-store objects, prefixes and globs (images,
    `.tar` shards and `.parquet` files, sorted), in the order of `patterns`, each input once.
    Parquet files in a store are read where they are captioned, from their first column named
    image, img or file_name."""
    sources: dict[object, Source] = {}
    missing: list[tuple[str, str]] = []
    for pattern in patterns:
        if is_store_url(pattern):
            found: list[Source] = list(list_store(pattern))
            if not found:
                missing.append((pattern, "no images, .tar shards or .parquet files here"))
            if image_column is not None and any(str(source).split("?")[0].endswith(".parquet") for source in found):
                raise UserError(f"{pattern}: --image-column does not reach Parquet files in object stores yet")
        else:
            found, problems = expand_inputs([pattern], image_column=image_column)
            missing += problems
        for source in found:
            sources.setdefault(file_identity(source) or source, source)
    return list(sources.values()), missing


def list_store(url: str) -> list[StoreObject]:
    """The objects a store URL names: the object itself, every object below a prefix, or the
    objects a glob (`*`, `?`, `[...]`; `**` for any depth) matches, sorted."""
    filesystem, path, options = _open(url)
    import pyarrow.fs as pafs

    scheme = url.split("://", 1)[0]
    magic = next((index for index, char in enumerate(path) if char in "*?["), None)
    try:
        if magic is None:
            info = filesystem.get_file_info(path)
            if info.type == pafs.FileType.File:
                return [StoreObject(url)]
            if info.type != pafs.FileType.Directory:
                return []
            found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        else:
            base = path[:magic].rpartition("/")[0]
            selector = pafs.FileSelector(base, recursive="/" in path[magic:] or "**" in path)
            found = [info for info in filesystem.get_file_info(selector) if fnmatch.fnmatch(info.path, path)]
    except OSError as error:
        raise UserError(f"{url}: cannot list ({error})") from None
    names = sorted(
        info.path for info in found if info.type == pafs.FileType.File and info.path.lower().endswith(_SUFFIXES)
    )
    return [StoreObject(f"{scheme}://{name}{options}") for name in names]


def read_store_object(url: str) -> Iterator[tuple[str, bytes | ImageLoadError]]:
    """(name, encoded image or why there is none) for an object: an image (named by its URL),
    each image member of a `.tar` shard (`URL#member`), or each row of a `.parquet` file
    (`URL#row=N`, from the first of its columns image, img, file_name that it has). An object
    that cannot be read gives its failure after the images read before."""
    filesystem, path, _ = _open(url)
    try:
        if path.lower().endswith(".tar"):
            yield from _tar_members(filesystem, path, url)
        elif path.lower().endswith(".parquet"):
            yield from _parquet_rows(filesystem, path, url)
        else:
            size = filesystem.get_file_info(path).size or 0
            if size > MAX_OBJECT_BYTES:
                yield url, ImageLoadError(url, f"is {size} bytes; images are refused over {MAX_OBJECT_BYTES}")
                return
            with filesystem.open_input_stream(path) as stream:
                yield url, stream.read()
    except (OSError, tarfile.TarError, ValueError, UserError) as error:  # pyarrow's: OSError or ValueError
        yield url, ImageLoadError(url, f"cannot read this object ({error})")


def _tar_members(filesystem: Any, path: str, url: str) -> Iterator[tuple[str, bytes | ImageLoadError]]:
    with filesystem.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile() or os.path.splitext(member.name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            name = f"{url}#{member.name}"
            if member.size > MAX_OBJECT_BYTES:
                yield name, ImageLoadError(name, f"is {member.size} bytes; images are refused over {MAX_OBJECT_BYTES}")
                continue
            yield name, tar.extractfile(member).read()


def _parquet_rows(filesystem: Any, path: str, url: str) -> Iterator[tuple[str, bytes | ImageLoadError]]:
    import pyarrow.parquet as pq

    with filesystem.open_input_file(path) as file:
        parquet = pq.ParquetFile(file)
        column = pick_column(parquet.schema_arrow.names, None, IMAGE_COLUMNS, "image", url)
        row = 0
        for group in range(parquet.num_row_groups):
            for value in parquet.read_row_group(group, columns=[column]).column(0).to_pylist():
                name = f"{url}#row={row}"
                data = value.get("bytes") if isinstance(value, dict) else value
                yield name, data if isinstance(data, bytes) else ImageLoadError(name, "no image bytes in this row")
                row += 1


def _open(url: str) -> tuple[Any, str, str]:
    """(pyarrow file system, path in it: "bucket/key", the URL's `?options` or "") for a store URL."""
    base, _, options = url.partition("?")
    scheme, _, path = base.partition("://")
    bucket = path.split("/", 1)[0]
    return (
        _filesystem(f"{scheme}://{bucket}" + (f"?{options}" if options else "")),
        path,
        f"?{options}" if options else "",
    )


@functools.lru_cache(maxsize=16)  # one client per bucket and options, not one per object
def _filesystem(bucket_url: str) -> Any:
    require("ray", "pyarrow", feature="object-store inputs")
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(bucket_url)[0]
    except (OSError, ValueError) as error:
        raise UserError(f"{bucket_url}: cannot open this store ({error})") from None
