"""WebDataset shards and input names: random access to tar shards, `read_image_bytes` for any
record's image, `read_shard` to stream a whole shard, what a name the user typed means (a file, or
a shard URL or `pipe:` command), and `expand_inputs`, which turns files, folders, globs and shard
patterns into the inputs to caption.

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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.inputs.hf_datasets import is_row_reference, read_parquet_image
from prefixcap.inputs.images import (
    IMAGE_EXTENSIONS,
    check_image_bytes,
    open_regular_file,
    os_error_reason,
    read_image_file,
)
from prefixcap.system.extras import require

# "path/to/shard.tar#member/name.jpg": the greedy `.+` lets the shard's own path contain a "#".
_MEMBER_REFERENCE = re.compile(r"^(?P<shard>.+\.tar)#(?P<member>.+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own files in a shard, not samples

# Remote or piped WebDataset shards ("https://host/shard-000.tar", "pipe:aws s3 cp ... -").
_URL = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)", re.IGNORECASE)
SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")


class LocalPath(str):
    """A file to open as a file, whatever its name looks like. Names found on disk (folder walks,
    glob matches) are always this: a file named `pipe:rm -rf ~;.jpg` must never reach a shell."""


class RemoteShard(str):
    """A WebDataset shard URL or `pipe:` command, as the user typed it: the only kind of input
    that webdataset's URL and pipe openers ever see."""


class StoredImage(str):
    """An image stored inside a local dataset file, `data.parquet#row=12`, found by expanding a
    Parquet input the user named: read with `read_image_bytes`, like a tar member. `outside_root`:
    whether a path the row holds may lead outside the Parquet file's folder (`--allow-outside-root`)."""

    def __new__(cls, reference: str, *, outside_root: bool = False) -> StoredImage:
        image = super().__new__(cls, reference)
        image.outside_root = outside_root  # (kept through pickling, to DataLoader workers and back)
        return image


Source = LocalPath | RemoteShard | StoredImage


def as_source(name: str) -> Source:
    """Decide, once, how a name is opened. Typed names keep their kind; a plain string counts as
    typed by the user (a command-line argument, a string passed to this API), so it is a URL or
    `pipe:` command only when it looks like one and no file or folder has that name."""
    if isinstance(name, (LocalPath, RemoteShard, StoredImage)):
        return name
    return RemoteShard(name) if _URL.match(name) and not os.path.lexists(name) else LocalPath(name)


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file `path` names through any links, or None if there is none:
    two names of one file (a link, `./a.jpg` and `a.jpg`) compare equal."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):  # missing, unreadable, or a name with a NUL byte
        return None
    return status.st_dev, status.st_ino


def is_shard(source: str) -> bool:
    """Whether `source` names a WebDataset shard: a remote shard, or a local tar file."""
    source = as_source(source)
    return isinstance(source, RemoteShard) or source.lower().endswith(SHARD_SUFFIXES)


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
    if Path(spec).is_dir():
        shards = shard_files(Path(spec).absolute())
        if not shards:
            raise UserError(f"{spec}: folder holds no .tar shards")
        return shards
    shards = []
    for name in expand_braces(spec):
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
        with open_regular_file(shard) as file, tarfile.open(fileobj=file, mode="r:") as tar:
            return {member.name: (member.offset_data, member.size) for member in tar if member.isfile()}
    except tarfile.ReadError as error:
        raise UserError(f"{shard}: not an uncompressed tar file ({error})") from None


def read_members(shard: str | Path, names: Iterable[str]) -> list[bytes]:
    """The contents of several members of `shard`, read through one open file; a member over
    MAX_IMAGE_BYTES is refused unread."""
    index = tar_index(shard)
    contents = []
    # A fresh file object per call keeps this safe in threads and in forked DataLoader workers.
    with open_regular_file(shard) as file:
        for name in names:
            if name not in index:
                raise UserError(f"{shard}: has no member {name!r}")
            offset, size = index[name]
            check_image_bytes(size, member_reference(shard, name))
            file.seek(offset)
            data = file.read(size)
            if len(data) != size:
                raise UserError(f"{shard}: truncated at member {name!r}")
            contents.append(data)
    return contents


def read_image_bytes(image: str) -> bytes:
    """The encoded bytes of a record's image: a file, a `shard.tar#member` of a WebDataset shard,
    or a `data.parquet#row=N` image of a Parquet dataset (a path it holds stays inside the file's
    folder, unless `image` is a `StoredImage` allowed outside).

    Raises `ImageLoadError` naming the image, so that `prepare` can report it and go on.
    """
    match = _MEMBER_REFERENCE.match(image)
    try:
        if is_row_reference(image):
            return read_parquet_image(image, allow_outside_root=isinstance(image, StoredImage) and image.outside_root)
        if match is None:
            return read_image_file(image)
        (data,) = read_members(match["shard"], [match["member"]])
        return data
    except UserError as error:
        if isinstance(error, ImageLoadError) and error.source == image:
            raise
        raise ImageLoadError(image, str(error)) from None
    except OSError as error:
        raise ImageLoadError(image, os_error_reason(error)) from None


def is_member_reference(image: str) -> bool:
    """Whether `image` names a member of a tar shard (`shard.tar#member`) or a row of a Parquet
    file (`data.parquet#row=N`), as records do."""
    return _MEMBER_REFERENCE.match(image) is not None or is_row_reference(image)


def image_key(sample: Mapping[str, Any]) -> str | None:
    """The key of a WebDataset sample's image (`jpg`, `png`, ...: its first image extension), or None."""
    return next((key for key in sample if f".{key}" in IMAGE_EXTENSIONS), None)


def read_shard(spec: str) -> Iterator[tuple[str, bytes | str]]:
    """("spec#key.ext", encoded image) for each sample of a WebDataset shard, in archive order, or
    ("spec#key[.ext]", reason) for a sample without an image, or whose image is over MAX_IMAGE_BYTES
    (skipped unread). A `LocalPath` is opened as a regular file whatever its name; only a
    `RemoteShard` (a URL or `pipe:` command) goes to webdataset's opener. A plain string is read
    with `as_source`. A shard that cannot be read (missing, not a regular file, truncated, a failed
    command) raises `ImageLoadError` naming it, after the samples read before the damage."""
    require("scale", "webdataset", feature="WebDataset shards")
    from webdataset import gopen
    from webdataset.tariterators import group_by_keys

    spec = as_source(spec)
    try:
        # closing a pipe raises if its command failed
        with gopen(spec) if isinstance(spec, RemoteShard) else open_regular_file(spec) as stream:
            for sample in group_by_keys(_tar_files(stream, spec)):
                key = image_key(sample)
                if key is None:
                    members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
                    yield f"{spec}#{sample['__key__']}", f"no image in this sample (has: {members})"
                else:
                    yield f"{spec}#{sample['__key__']}.{key}", sample[key]
    except ImageLoadError:  # a local shard that is not a regular file
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a remote or corrupt shard is reported
        raise ImageLoadError(spec, f"cannot read this shard ({_reason(error)})") from None


def _tar_files(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    """The files of a tar stream as webdataset's `tar_file_expander` gives them to `group_by_keys`,
    except that a file over MAX_IMAGE_BYTES is skipped unread and has the reason as its data."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isreg() and not _TAR_META.match(member.name):
                try:
                    check_image_bytes(member.size, member.name)
                    data: bytes | str = tar.extractfile(member).read()
                except ImageLoadError as refused:
                    data = refused.reason
                yield {"fname": member.name, "data": data, "__url__": url}
            tar.members = []  # a stream: keep no list of the members read


def _reason(error: Exception) -> str:
    """The message of an error raised through webdataset, which appends its stream objects to
    the exception's args and " @ <stream>" to the message."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    message = str(error.args[0]).split(" @ ")[0] if error.args else ""
    if status := re.search(r": exit (\d+) \(read\)", message):  # a `pipe:` command failed
        return f"the command exited with status {status[1]}"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def expand_braces(pattern: str) -> list[str]:
    """Brace patterns (`shard-{000..099}.tar`) and `::` lists expanded as webdataset does; any other
    name as it is (webdataset would drop its backslashes)."""
    if "{" not in pattern and "::" not in pattern:
        return [pattern]
    require("scale", "webdataset", feature="shard patterns")
    from webdataset.shardlists import expand_urls  # imports torch: only when a pattern needs it

    return expand_urls(pattern)
