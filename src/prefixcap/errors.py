"""Errors a user can cause. Each prints as one line, without a traceback."""


class UserError(Exception):
    """An expected error, shown to the user as a single line."""


class ImageLoadError(UserError):
    """An image that cannot be used: `source` names it (a path, "shard.tar#member", "images[2] (a.jpg)"),
    `reason` says why in one line. Loaders raise it, and carry it as a value in place of the image
    (its args are exactly (source, reason), so it pickles through DataLoader worker processes)."""

    def __init__(self, source: str, reason: str):
        super().__init__(source, reason)
        self.source, self.reason = source, reason

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class ImageTooLargeError(ImageLoadError):
    """An image has more pixels than the configured limit (a decompression-bomb guard)."""


class ModelLoadError(UserError):
    """A model directory or hub id is missing files or has inconsistent sizes."""
