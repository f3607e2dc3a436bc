"""Reading the files a user, a dataset or a model folder names: regular files only, opened without
ever blocking (a FIFO would wait for a writer forever), optionally without following a link, and
read up to a cap (a device or a mistaken file never ends). Refusals are OSErrors whose `strerror`
says why in a few words, so that each caller names the file in its own error type."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}


class NotRegularFileError(OSError):
    """A FIFO, device or socket where a regular file was expected."""


class TooLargeError(OSError):
    """A file over the cap its reader allows."""


def open_regular(path: str | Path, *, follow_links: bool = True) -> BinaryIO:
    """`path` opened for reading if it is a regular file, else an OSError saying what it is. A
    special file is refused before it is opened, the open never blocks (O_NONBLOCK) and what was
    opened is checked again, so a file swapped for a FIFO in between cannot hang a reader either.
    Without `follow_links` a link is refused too (O_NOFOLLOW)."""
    status = os.stat(path, follow_symlinks=follow_links)
    _check_regular(status.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0)))
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_links:
            raise OSError(errno.ELOOP, "a link; only a regular file is read") from None
        raise
    file = os.fdopen(descriptor, "rb")
    try:
        _check_regular(os.fstat(descriptor).st_mode)
    except BaseException:
        file.close()
        raise
    return file


def read_regular(path: str | Path, limit: int, *, follow_links: bool = True) -> bytes:
    """The bytes of the regular file `path` (see `open_regular`), if it holds at most `limit`;
    TooLargeError otherwise, decided from its size before reading and from what was read."""
    with open_regular(path, follow_links=follow_links) as file:
        check_size(os.fstat(file.fileno()).st_size, limit)
        data = file.read(limit + 1)  # + 1: a file that grows while it is read
    check_size(len(data), limit)
    return data


def check_size(size: int, limit: int) -> None:
    """TooLargeError for `size` bytes over `limit`."""
    if size > limit:
        raise TooLargeError(errno.EFBIG, f"{size:,} bytes, over the {limit:,}-byte limit")


def _check_regular(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    if not stat.S_ISREG(mode):
        kind = next((kind for test, kind in _KINDS.items() if test(mode)), "a socket or other special file")
        raise NotRegularFileError(errno.EINVAL, f"not a regular file ({kind})")
