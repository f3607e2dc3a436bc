"""Atomic writes: a file or folder appears complete or not at all. A crash then loses nothing
already written, and a rerun never trusts half a file."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same file system, so the final rename is atomic) that
    replaces `path` once the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(staging)
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp files are private; results should not be
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: str | Path, *, binary: bool = False) -> Iterator[IO]:
    """An open file that replaces `path` only once written completely."""
    with atomic_path(path) as staging:
        with open(staging, "wb") if binary else open(staging, "w", newline="", encoding="utf-8") as file:
            yield file


def write_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as file:
        file.write(text)


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written `staging` folder into `target`'s place. Readers see the old folder or
    the new one; only a crash between the two renames leaves neither."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
