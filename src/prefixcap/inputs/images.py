"""One image loader for every entry point (CLI, Python API, data preparation, server).

Captioning models see RGB pixels, but real inputs arrive as palette GIFs, 16-bit PNGs, CMYK
JPEGs, rotated phone photos and truncated downloads. Normalising all of that in one place keeps
every entry point equally robust, and turns every failure into one typed, readable error.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prefixcap.errors import ImageLoadError, ImageTooLargeError
from prefixcap.system.files import NotRegularFileError, TooLargeError, check_size, open_regular, read_regular

ImageSource = str | Path | bytes | bytearray | Image.Image | np.ndarray

# Refuse images above this many pixels before decoding them (decompression bombs). 64 MP
# covers every camera photo; the server and CLI make it configurable.
DEFAULT_MAX_PIXELS = 64_000_000
# Refuse image files (and shard members, and Parquet cells) over this many bytes before reading
# them: a file is read whole before it is decoded. 256 MiB holds an uncompressed 8-bit RGBA image
# at the default pixel limit.
MAX_IMAGE_BYTES = 256 * 2**20
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_IS_A_DIRECTORY = "is a directory, not an image"
_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a browser would
# What `load_image` holds at its peak, in bytes per pixel, for images of each PIL mode: the decoded
# image (PIL keeps RGB in 4 bytes a pixel) and its conversion to RGB, measured with Pillow 13 and
# rounded up; other modes get the largest. A server budgets concurrent decodes with it.
_PEAK_BYTES_PER_PIXEL = {"1": 6, "L": 6, "RGB": 5, "YCbCr": 9, "CMYK": 9, "P": 10, "RGBA": 10, "LA": 13}
_MOST_BYTES_PER_PIXEL = 20


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    min_size: int | None = None,
) -> Image.Image:
    """Return `source` as an upright RGB PIL image, or raise `ImageLoadError` naming it.

    `min_size` lets a JPEG decode at the smallest scale (1/2, 1/4 or 1/8: PIL's draft mode, done
    in the DCT) that keeps both sides at least `min_size` pixels, several times faster for large
    photos; the pixels then differ slightly from a full decode that is resized afterwards."""
    label = source_label(source, name)
    with _named_errors(label, max_pixels):
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, np.ndarray):
            image = _from_array(source, label)
        else:
            image = _open(source, label)
        _check_size(image, max_pixels, label)
        _draft(image, min_size)
        image.seek(0)  # first frame of animations
        image.load()  # decode now, so truncated files fail here and not later
        if image is source:  # the caller's image: leave it as it is
            image = ImageOps.exif_transpose(image)
        else:  # ours: rotate in place rather than copy a large image when there is nothing to do
            ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


def open_image(
    source: str | Path | bytes | bytearray, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """`source` with only its header read: format, mode and size are known and checked against
    `max_pixels`, and no pixel is decoded yet. A server uses it to refuse bad or oversized images
    and to learn what decoding one will cost (`decode_bytes`) before it pays for the decode.
    Raises `ImageLoadError` as `load_image` does."""
    label = source_label(source, name)
    with _named_errors(label, max_pixels):
        image = _open(source, label)
        _check_size(image, max_pixels, label)
        return image


def decode_bytes(image: Image.Image, min_size: int | None = None) -> int:
    """About the most memory `load_image(..., min_size=min_size)` holds at once while decoding
    `image`, an image from `open_image` (whose JPEG draft scale this sets)."""
    _draft(image, min_size)
    width, height = image.size
    return width * height * _PEAK_BYTES_PER_PIXEL.get(image.mode, _MOST_BYTES_PER_PIXEL)


def source_label(source: object, name: str | None = None) -> str:
    """What errors call an image: `name` if given, else its path, else its type."""
    return name or (str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>")


def _draft(image: Image.Image, min_size: int | None) -> None:
    if min_size is not None and image.format == "JPEG":
        image.draft(image.mode, (min_size, min_size))  # a second call changes nothing


@contextmanager
def _named_errors(label: str, max_pixels: int | None) -> Iterator[None]:
    """Turn every way reading an image fails into one `ImageLoadError` naming `label`."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise ImageLoadError(label, os_error_reason(error)) from None
    except UnidentifiedImageError:
        raise ImageLoadError(label, "not an image, or an unsupported format") from None
    except Image.DecompressionBombError:
        # PIL refuses images over twice its MAX_IMAGE_PIXELS as it opens them, before our check
        # runs, and its message quotes its own limit; the user knows only theirs.
        pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        limit = (
            "PIL.Image.MAX_IMAGE_PIXELS" if max_pixels is None or max_pixels > pil_limit else f"limit {max_pixels:,}"
        )
        raise ImageTooLargeError(label, f"too many pixels (over {pil_limit:,} > {limit})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(label, f"corrupt or truncated image ({error})") from None


def os_error_reason(error: OSError) -> str:
    """Why a file cannot be read, in a few words: one wording for image files and shard members."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return _IS_A_DIRECTORY
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, NotRegularFileError):
        return error.strerror
    return f"cannot read ({error.strerror or error})"


def open_regular_file(path: str | Path, *, name: str | None = None) -> BinaryIO:
    """`path` opened for reading if it is a regular file (through links: `system.files.open_regular`),
    else `ImageLoadError` naming it (`name`, else the path). For every file whose bytes a dataset or
    a user names: images, shards, Parquet files."""
    label = name or str(path)
    with _file_errors(label):
        return open_regular(path)


def read_image_file(path: str | Path, *, name: str | None = None) -> bytes:
    """The bytes of the image file `path`: a regular file of at most MAX_IMAGE_BYTES, else
    `ImageLoadError` naming it. The one way image files are read."""
    label = name or str(path)
    with _file_errors(label):
        return read_regular(path, MAX_IMAGE_BYTES)


def check_image_bytes(size: int, label: str) -> None:
    """Refuse an image of `size` bytes over MAX_IMAGE_BYTES, before it is read."""
    with _file_errors(label):
        check_size(size, MAX_IMAGE_BYTES)


@contextmanager
def _file_errors(label: str) -> Iterator[None]:
    """A file that cannot be read as an image file, as `ImageLoadError` naming `label`."""
    try:
        yield
    except TooLargeError as error:
        raise ImageLoadError(label, f"{error.strerror} for an image") from None
    except OSError as error:
        raise ImageLoadError(label, os_error_reason(error)) from None
    except ValueError:  # a name with a NUL byte
        raise ImageLoadError(label, "no such file") from None


def _open(source: str | Path | bytes | bytearray, label: str) -> Image.Image:
    if isinstance(source, (str, Path)):
        source = read_image_file(source, name=label)
        if not source:
            raise ImageLoadError(label, "empty file")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageLoadError(label, "empty data")
        stream = io.BytesIO(source)
    else:
        raise ImageLoadError(label, f"a {type(source).__name__} is not an image, a path or image bytes")
    with warnings.catch_warnings():
        # We enforce our own pixel limit below; PIL's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(stream)


def _check_size(image: Image.Image, max_pixels: int | None, label: str) -> None:
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageLoadError(label, "image has no pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            label, f"too many pixels ({width}x{height} = {width * height:,} > limit {max_pixels:,})"
        )


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    """Accept HxW or HxWxC arrays of uint8, uint16 or floats in [0, 1]."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageLoadError(label, f"array of shape {array.shape} is not HxW or HxWx{{1,3,4}}")
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # NaN: black
    elif array.dtype != np.uint8:
        raise ImageLoadError(label, f"array dtype {array.dtype} is not uint8, uint16 or float")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited on white, 16-bit is scaled down."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.uint32)
        scale = 65535 if pixels.max(initial=0) > 255 else 255
        return Image.fromarray((pixels * 255 // scale).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float32))
        peak = float(pixels.max(initial=0.0)) or 1.0
        return Image.fromarray((np.clip(pixels / peak, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # (converting would copy)
        background = Image.new("RGB", rgba.size, _BACKGROUND)
        background.paste(rgba, mask=rgba)  # an RGBA mask is its alpha band, without a copy of it
        return background
    return image.convert("RGB")
