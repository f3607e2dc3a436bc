"""Random access to WebDataset tar shards, and `read_image_bytes` for any record's image.

The `webdataset` library streams a shard from start to end, which suits training loops but not
`prepare`, which fetches single images, in parallel, and resumes in the middle of a dataset. An
uncompressed tar stores every member contiguously, so a cached index of member offsets (built by
`tarfile`, which seeks over the data instead of reading it) gives each image in one `seek` + `read`.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from prefixcap.errors import ImageLoadError, UserError

# "path/to/shard.tar#member/name.jpg": the greedy `.+` lets the shard's own path contain a "#".
_MEMBER_REFERENCE = re.compile(r"^(?P<shard>.+\.tar)#(?P<member>.+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def member_reference(shard: str | Path, member: str) -> str:
    """The `CaptionRecord.image` string for a member of a tar shard."""
    return f"{shard}#{member}"


def is_shard_spec(spec: str) -> bool:
    """Whether `spec` names shards: a `.tar` file, a brace pattern or a glob."""
    return spec.endswith(".tar") or "{" in spec or "::" in spec or bool(_GLOB_CHARS.search(spec))


def shard_files(folder: Path) -> list[Path]:
    """The shards of a folder: its `.tar` files and those of its subfolders (e.g. `train/`, `val/`)."""
    return sorted([*folder.glob("*.tar"), *folder.glob("*/*.tar")])


def expand_shards(spec: str) -> list[Path]:
    """The absolute paths of the shards named by a folder, a file, or a WebDataset pattern.

    Patterns are expanded like `webdataset.WebDataset` does (`shards-{000..009}.tar`, several
    patterns joined by `::`), and each result may also be a shell glob.
    """
    from webdataset.shardlists import (
        expand_urls,  # imports torch: only when shards are used
    )

    if Path(spec).is_dir():
        shards = shard_files(Path(spec).absolute())
        if not shards:
            raise UserError(f"{spec}: folder holds no .tar shards")
        return shards
    shards = []
    for name in expand_urls(spec):
        matches = sorted(glob.glob(name)) if _GLOB_CHARS.search(name) else [name]
        if not matches:
            raise UserError(f"{name}: no file matches this pattern")
        for match in matches:
            if not Path(match).is_file():
                raise UserError(f"{match}: no such shard file")
            shards.append(Path(match).absolute())
    return shards


def tar_index(shard: str | Path) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of every regular file in `shard`, in archive order."""
    shard = os.fspath(shard)
    try:
        return _cached_index(shard, os.stat(shard).st_mtime_ns)
    except FileNotFoundError:
        raise UserError(f"{shard}: no such shard file") from None


@functools.lru_cache(maxsize=8)  # readers go through shards in order; a few indexes are enough
def _cached_index(shard: str, mtime_ns: int) -> dict[str, tuple[int, int]]:
    # mtime_ns is part of the cache key so that a rewritten shard is indexed again.
    try:
        with tarfile.open(shard, mode="r:") as tar:
            return {member.name: (member.offset_data, member.size) for member in tar if member.isfile()}
    except tarfile.ReadError as error:
        raise UserError(f"{shard}: not an uncompressed tar file ({error})") from None


def read_members(shard: str | Path, names: Iterable[str]) -> list[bytes]:
    """The contents of several members of `shard`, read through one open file."""
    index = tar_index(shard)
    contents = []
    # A fresh file object per call keeps this safe in threads and in forked DataLoader workers.
    with open(shard, "rb") as file:
        for name in names:
            if name not in index:
                raise UserError(f"{shard}: has no member {name!r}")
            offset, size = index[name]
            file.seek(offset)
            data = file.read(size)
            if len(data) != size:
                raise UserError(f"{shard}: truncated at member {name!r}")
            contents.append(data)
    return contents


def read_image_bytes(image: str) -> bytes:
    """The encoded bytes of a record's image: a file, or a `shard.tar#member` of a WebDataset shard.

    Raises `ImageLoadError` naming the image, so that `prepare` can report it and go on.
    """
    match = _MEMBER_REFERENCE.match(image)
    try:
        if match is None:
            return Path(image).read_bytes()
        (data,) = read_members(match["shard"], [match["member"]])
        return data
    except FileNotFoundError:
        raise ImageLoadError(f"{image}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{image}: is a directory, not an image") from None
    except PermissionError:
        raise ImageLoadError(f"{image}: permission denied") from None
    except UserError as error:
        raise ImageLoadError(f"{image}: {error}") from None
    except OSError as error:
        raise ImageLoadError(f"{image}: cannot read ({error.strerror or error})") from None
