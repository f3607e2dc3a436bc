"""What to caption: the files, folders, globs, WebDataset shard patterns, Parquet datasets and hub
datasets a user names, expanded into typed sources (`prefixcap.inputs.sources`).

Only a pattern itself (or a name its braces expand to) can be a URL or `pipe:` command; every name
found on disk is a `LocalPath`, which is only ever opened as a file.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prefixcap.inputs.hf_datasets import dataset_kind, is_hub_dataset, resolve_hub_dataset, row_references
from prefixcap.inputs.images import IMAGE_EXTENSIONS
from prefixcap.inputs.sources import (
    LocalPath,
    RemoteShard,
    Source,
    StoredImage,
    as_source,
    expand_braces,
    file_identity,
)

Rows = Callable[[Path], Iterator[StoredImage]]  # the rows of a Parquet file or folder, as inputs


def expand_inputs(
    patterns: list[str],
    *,
    image_column: str | None = None,
    within_tree: bool = False,
    allow_outside_root: bool = False,
) -> tuple[list[Source], list[tuple[str, str]]]:
    """Files as given, folders searched recursively for image extensions, globs expanded, and
    WebDataset shards: tar files, URLs and `pipe:` commands, with brace patterns
    (`shard-{000..099}.tar`) and `::` lists expanded as webdataset does. Parquet datasets (a
    `.parquet` file, or a folder of them without images) become one `StoredImage` per row, read
    from `image_column` (default: the first of `image`, `img`, `file_name`); a hub dataset
    `hf://datasets/OWNER/NAME[@rev]` is downloaded (or taken from the cache), then expanded. A
    row's image may be a path, which must stay inside its Parquet file's folder unless
    `allow_outside_root` (see `dataset_paths`).

    Only a pattern itself (or a name its braces expand to) can be a URL or `pipe:` command, and
    only when no file or folder has that name: every name found on disk is a `LocalPath`.
    `within_tree`: folder walks follow a symlinked folder only when it leads to a folder inside the
    one being walked (a command that writes beside the images must not reach other trees); the
    links not followed are listed with the problems. Returns (inputs in a stable order, each file
    once however it was reached, and [(pattern or folder, reason)] for patterns that matched nothing
    and folders that could not be read)."""
    finder = _Finder(within_tree=within_tree)
    sources: dict[object, Source] = {}

    def rows(path: Path) -> Iterator[StoredImage]:
        for reference in row_references(path, image_column):
            yield StoredImage(reference, outside_root=allow_outside_root)

    for pattern in patterns:
        problems = len(finder.problems)
        found = list(_expand_one(pattern, finder, rows))
        if not found and len(finder.problems) == problems:
            finder.problems[pattern] = _nothing_found(pattern)
        for source in found:  # (a dataset's rows and remote shards are not files of their own)
            sources.setdefault(isinstance(source, LocalPath) and file_identity(source) or source, source)
    return list(sources.values()), list(finder.problems.items())


def _expand_one(pattern: str, finder: _Finder, rows: Rows) -> Iterator[Source]:
    if is_hub_dataset(pattern) and not os.path.lexists(pattern):
        yield from _folder_or_file(str(resolve_hub_dataset(pattern)), finder, rows)
        return
    source = as_source(pattern)
    if isinstance(source, RemoteShard):
        yield from map(RemoteShard, expand_braces(pattern))  # remote shards are only opened when their turn comes
    elif os.path.lexists(pattern):
        yield from _folder_or_file(source, finder, rows)  # an explicit file is tried whatever its extension
    elif (names := expand_braces(pattern)) != [pattern]:
        for name in names:
            yield from _expand_one(name, finder, rows)
    elif glob.has_magic(pattern):
        for match in finder.glob(pattern):
            yield from _folder_or_file(match, finder, rows)


def _folder_or_file(path: str, finder: _Finder, rows: Rows) -> Iterator[Source]:
    """The images of a folder (or the rows of its Parquet files when it holds no images); the rows
    of a Parquet file; any other file as it is."""
    if os.path.isdir(path):
        images = finder.images(path)
        if not images and dataset_kind(path) == "parquet":
            yield from rows(Path(path))
        yield from images
    elif path.lower().endswith(".parquet") and os.path.isfile(path):
        yield from rows(Path(path))
    else:
        yield LocalPath(path) if not isinstance(path, (LocalPath, RemoteShard)) else path


def _nothing_found(pattern: str) -> str:
    if os.path.isdir(pattern):
        return "no images in this folder"
    return "no match" if glob.has_magic(pattern) else "no such file or directory"


class _Finder:
    """Finds files on disk; every name it returns is a `LocalPath`. Symlinked folders are
    followed, but each walk reads a real folder once, so that symlink loops neither hang nor
    repeat images; a folder that cannot be read goes into `problems`, not skipped in silence.
    With `within_tree`, a walk follows only the folder links that stay inside its top folder."""

    def __init__(self, *, within_tree: bool = False) -> None:
        self.within_tree = within_tree
        self.problems: dict[str, str] = {}  # folder -> why it could not be read (or was not followed)

    def images(self, top: str) -> list[LocalPath]:
        """The image files in folder `top` and all its subfolders, sorted."""
        top = str(Path(top))  # named as pathlib names them: "photos/a.jpg" for "photos//", "a.jpg" for "."
        return sorted(
            LocalPath(os.path.join(folder, entry.name))
            for folder, entries in self._walk("" if top == os.curdir else top, hidden=True)
            for entry in entries
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and _is(entry.is_file)
        )

    def glob(self, pattern: str) -> list[LocalPath]:
        """Like `glob.glob(pattern, recursive=True)`, sorted, where `**` (any depth of folders)
        visits each real folder once."""
        base = os.sep if pattern.startswith(os.sep) else ""
        return sorted(map(LocalPath, self._match(base, [part for part in pattern.split(os.sep) if part])))

    def _match(self, base: str, parts: list[str]) -> Iterator[str]:
        """The paths below folder `base` ("" for the working folder) that match the components `parts`."""
        head, rest = parts[0], parts[1:]
        if head == "**":
            if not rest:  # `dir/**`: the folder, which is then searched whole
                yield base or os.curdir
                return
            for folder, _ in self._walk(base, hidden=False):
                yield from self._match(folder, rest)
        elif glob.has_magic(head):
            for entry in self._entries(base) or []:
                if fnmatch.fnmatch(entry.name, head) and (head.startswith(".") or not entry.name.startswith(".")):
                    path = os.path.join(base, entry.name)
                    if not rest:
                        yield path
                    elif _is(entry.is_dir):
                        yield from self._match(path, rest)
        else:
            path = os.path.join(base, head)
            if not rest:
                if os.path.lexists(path):
                    yield path
            elif os.path.isdir(path):
                yield from self._match(path, rest)

    def _walk(self, top: str, *, hidden: bool) -> Iterator[tuple[str, list[os.DirEntry]]]:
        """(folder, its entries) for `top` and every readable folder below it, symlinked or not,
        each real folder once. `hidden`: also enter folders whose names start with "."."""
        seen: set[tuple[int, int]] = set()
        root = os.path.realpath(top or os.curdir)
        stack = [top]
        while stack:
            folder = stack.pop()
            identity = file_identity(folder or os.curdir)
            if identity in seen or (entries := self._entries(folder)) is None:
                continue
            if identity is not None:
                seen.add(identity)
            yield folder, entries
            subfolders = [e for e in entries if (hidden or not e.name.startswith(".")) and _is(e.is_dir)]
            if self.within_tree:
                subfolders = [entry for entry in subfolders if self._inside(entry, root, top or os.curdir)]
            stack.extend(os.path.join(folder, entry.name) for entry in reversed(subfolders))  # sorted, depth first

    def _inside(self, entry: os.DirEntry, root: str, top: str) -> bool:
        """Whether a subfolder leads inside `root` (the real path of the walk's `top`); a link
        that leaves it is noted as a problem."""
        if not entry.is_symlink() or is_within(os.path.realpath(entry.path), root):
            return True
        self.problems[entry.path] = f"a link to a folder outside {top}; not followed in sidecar mode"
        return False

    def _entries(self, folder: str) -> list[os.DirEntry] | None:
        """The entries of `folder` ("" for the working folder) sorted by name, or None (and a
        problem noted) if it cannot be read."""
        try:
            with os.scandir(folder or os.curdir) as listing:
                return sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            self.problems[folder or os.curdir] = f"cannot read this folder ({error.strerror or error})"
            return None


def is_within(path: str, root: str) -> bool:
    """Whether `path` is `root` or below it (both real paths: links resolved)."""
    return os.path.commonpath([path, root]) == root


def _is(test: Callable[[], bool]) -> bool:
    """`DirEntry.is_file` or `.is_dir` (through links), False where the entry cannot be examined."""
    try:
        return test()
    except OSError:
        return False
