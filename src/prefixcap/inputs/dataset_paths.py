"""Image paths read from dataset files (JSONL and CSV cells, COCO and Karpathy entries, imagefolder
`file_name`s, Parquet path cells) are data written by whoever made the dataset: each must stay
inside the dataset's root, through links, unless the user allows paths outside it
(`--allow-outside-root`). Otherwise a downloaded dataset could make `prepare` encode, `evaluate`
show and `caption --embed-images` copy any image the user can read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from prefixcap.errors import UserError

OUTSIDE_ROOT_FLAG = "--allow-outside-root"


@dataclass(frozen=True)
class Confinement:
    """Where a dataset's image paths may lead: inside the root each reader resolves them from (or
    inside `root`, for a hub dataset: its folder in the cache, whose files link to its blobs), once
    links are resolved; anywhere with `allow_outside_root`."""

    allow_outside_root: bool = False
    root: Path | None = None
    # real path of each folder seen: the records of a dataset share few folders
    _folders: dict[str, Path] = field(default_factory=dict, compare=False, repr=False)

    def path(self, path: Path, root: Path, where: str) -> str:
        """`path` (resolved from `root`) as an absolute path, or a UserError at `where`."""
        if reason := self.problem(path, root):
            raise UserError(f"{where}: {reason}")
        return str(path.absolute())

    def problem(self, path: Path, root: Path) -> str | None:
        """Why `path` may not be read, or None."""
        if self.allow_outside_root or "\0" in str(path):  # (no file has a NUL in its name)
            return None
        root = (self.root or root).absolute()
        if self._real(path.absolute()).is_relative_to(self._real_folder(root)):
            return None
        return f"image {path} is outside the dataset's root {root} (through links too); {OUTSIDE_ROOT_FLAG} reads it"

    def _real(self, path: Path) -> Path:
        """`path` with every link resolved: its folder's, and the one the file itself may be."""
        if path.is_symlink():
            return Path(os.path.realpath(path))
        return Path(os.path.normpath(os.path.join(self._real_folder(path.parent), path.name)))

    def _real_folder(self, folder: Path) -> Path:
        key = str(folder)
        if key not in self._folders:
            self._folders[key] = Path(os.path.realpath(folder))
        return self._folders[key]
