"""Errors a user can cause. Each prints as one line, without a traceback."""


class UserError(Exception):
    """An expected error, shown to the user as a single line."""


class ImageLoadError(UserError):
    """An image could not be read; the message names the source and the reason."""


class ImageTooLargeError(ImageLoadError):
    """An image has more pixels than the configured limit (a decompression-bomb guard)."""


class ModelLoadError(UserError):
    """A model directory or hub id is missing files or has inconsistent sizes."""
