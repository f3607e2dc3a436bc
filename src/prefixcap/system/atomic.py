"""Atomic writes: a file or folder appears complete or not at all. A crash then loses nothing
already written, and a rerun never trusts half a file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from prefixcap.errors import UserError


@contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `path` (same file system, so the final rename is atomic) that
    replaces `path` once the block ends without an error, with permissions `mode` (default: the
    umask's, as a new file gets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(staging)
        os.chmod(staging, 0o666 & ~_umask() if mode is None else mode)  # mkstemp files are private
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: str | Path, *, binary: bool = False, mode: int | None = None) -> Iterator[IO]:
    """An open file that replaces `path` only once written completely (`mode`: see `atomic_path`)."""
    with atomic_path(path, mode=mode) as staging:
        with open(staging, "wb") if binary else open(staging, "w", newline="", encoding="utf-8") as file:
            yield file


def write_atomic(path: str | Path, text: str, *, mode: int | None = None) -> None:
    with atomic_file(path, mode=mode) as file:
        file.write(text)


@contextmanager
def atomic_dir(path: str | Path, *, ours: Collection[str] | None = None) -> Iterator[Path]:
    """A new, empty folder beside `path` that replaces `path` (a folder or nothing) once the
    block ends without an error. Callers check first that `path` may be replaced
    (`check_output_dir`): the old folder is deleted, except, given the names of the entries
    the folder's writer makes (`ours`), every other entry, which the new folder keeps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield staging
        share_tree(staging)
        replace_dir(staging, path, ours=ours)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def share_tree(folder: str | Path) -> None:
    """Give a folder we just wrote, and everything in it, the umask's permissions. mkdtemp makes
    folders private and safetensors writes 0600 files, so results would otherwise be unreadable
    to other users (a shared model, a server account)."""
    umask = _umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, 0o666 & ~umask)


def replace_dir(staging: Path, target: Path, *, ours: Collection[str] | None = None) -> None:
    """Swap a fully written `staging` folder into `target`'s place. Readers see the old folder or
    the new one; only a crash between the two renames leaves neither (the old one is then
    `.NAME.old-PID` beside it).

    Given `ours`, the names of the entries that the folder's writer makes, the old folder's other
    entries (a user's notes, an `evaluate --out` folder inside a checkpoint) move into the new one
    once it is in place; they are never inside a folder that is deleted. One that cannot move
    (the new folder has an entry of that name) stays in `.NAME.old-PID`, with nothing deleted."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    staging.rename(target)
    if ours is not None:
        for name in foreign_entries(old, ours):
            if not os.path.lexists(target / name):
                (old / name).rename(target / name)
        if foreign_entries(old, ours):  # some could not move: delete only the writer's own entries
            for name in ours:
                entry = old / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            return
    shutil.rmtree(old, ignore_errors=True)


def holds_only(path: Path, names: Collection[str]) -> bool:
    """Whether every entry of folder `path` is one of `names`, or a leftover staging copy of one
    (".NAME.*", as `atomic_path` and `atomic_dir` name them)."""
    return not foreign_entries(path, names)


def foreign_entries(path: Path, names: Collection[str]) -> list[str]:
    """The entries of folder `path`, sorted, that are neither one of `names` nor a leftover staging
    copy of one (".NAME.*"): what a writer of `names` did not make."""
    return sorted(
        entry.name
        for entry in path.iterdir()
        if entry.name not in names and not any(entry.name.startswith(f".{name}.") for name in names)
    )


def check_output_dir(
    path: str | Path,
    *,
    what: str,
    is_ours: Callable[[Path], bool],
    overwrite: bool,
    entries: Collection[str] | None = None,
    keep_foreign: bool = False,
) -> None:
    """Refuse to write a `what` (e.g. "prefixcap model directory") into a folder that holds
    anything else: no command may delete or mix into files it did not create. A missing or empty
    folder is fine; one that `is_ours` recognises is replaced only with `overwrite`. Given the
    names a `what` consists of (`entries`), one that `is_ours` recognises but that also holds other
    entries is refused, naming them, or with `keep_foreign` accepted (`replace_dir(ours=entries)`
    then keeps them)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder")
    if not any(path.iterdir()):
        return
    if not is_ours(path):
        raise UserError(
            f"{path}: is not empty and is not a {what}; refusing to write into it (choose a new or empty folder)"
        )
    foreign = foreign_entries(path, entries) if entries is not None and not keep_foreign else []
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"{path}: holds {listed}, which a {what} does not; refusing to replace the folder "
            f"(move {'it' if len(foreign) == 1 else 'them'} elsewhere, or choose another folder)"
        )
    if not overwrite:
        raise UserError(f"{path}: already holds a {what}; pass --overwrite to replace it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
