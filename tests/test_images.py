"""The shared image loader: every mode becomes RGB, and every bad input fails one typed way."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from prefixcap.errors import ImageLoadError, ImageTooLargeError
from prefixcap.inputs.images import load_image, open_image
from tests.helpers_data import measures_peak_memory, peak_memory_growth


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    image = load_image(Image.new(mode, (7, 5)))
    assert image.mode == "RGB" and image.size == (7, 5)


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_png_keeps_brightness(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    loaded = load_image(encode(image, "JPEG", exif=exif))
    assert loaded.size == (20, 40)


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    pixel = load_image(buffer.getvalue()).getpixel((0, 0))
    assert pixel[0] > 200 and pixel[2] < 50


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((6, 4), np.uint8),
        np.zeros((6, 4, 3), np.uint8),
        np.zeros((6, 4, 4), np.uint8),
        np.ones((6, 4, 3), np.float32),
        np.zeros((6, 4, 1), np.uint16),
    ],
)
def test_numpy_arrays(array):
    assert load_image(array).size == (4, 6)


def test_path_and_bytes_give_the_same_pixels(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (3, 3), (10, 20, 30)).save(path)
    assert load_image(path).tobytes() == load_image(path.read_bytes()).tobytes() == load_image(str(path)).tobytes()


@pytest.mark.parametrize(
    "size, fmt, min_size, decoded",
    [
        ((1600, 1200), "JPEG", 224, (400, 300)),  # 1/4: the largest reduction keeping both sides >= 224
        ((1600, 1200), "JPEG", None, (1600, 1200)),  # no min_size: a full decode
        ((300, 250), "JPEG", 224, (300, 250)),  # 1/2 would go below 224
        ((1600, 1200), "PNG", 224, (1600, 1200)),  # only JPEGs decode at reduced scale
    ],
)
def test_jpeg_min_size_decodes_at_reduced_scale(size, fmt, min_size, decoded):
    data = encode(Image.new("RGB", size, (200, 100, 50)), fmt)
    image = load_image(data, min_size=min_size)
    assert image.size == decoded and image.mode == "RGB"


def test_pixel_limit_refuses_bombs_before_decoding():
    data = encode(Image.new("L", (2000, 2000)))
    with pytest.raises(ImageTooLargeError, match="bomb.png: too many pixels"):
        load_image(data, max_pixels=1_000_000, name="bomb.png")
    assert load_image(data, max_pixels=None).size == (2000, 2000)


def make_bad_inputs(tmp_path):
    jpeg = encode(Image.new("RGB", (64, 64), "green"), "JPEG")
    files = {
        "empty.jpg": b"",
        "text.jpg": b"this is not an image at all",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.png": encode(Image.new("RGB", (16, 16)))[:40] + b"\x00" * 200,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


@pytest.mark.parametrize(
    "name, reason",
    [
        ("empty.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("truncated.jpg", "corrupt or truncated"),
        ("corrupt.png", "corrupt or truncated|not an image"),
        ("missing.jpg", "no such file"),
    ],
)
def test_bad_files_raise_one_error_naming_file_and_reason(tmp_path, name, reason):
    make_bad_inputs(tmp_path)
    with pytest.raises(ImageLoadError, match=f"{name}: ({reason})") as info:
        load_image(tmp_path / name)
    assert "\n" not in str(info.value)


def test_bad_bytes_and_arrays(tmp_path):
    with pytest.raises(ImageLoadError, match="upload.bin: empty data"):
        load_image(b"", name="upload.bin")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(b"GIF89a garbage")
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


# A file over the byte cap whose first bytes are a valid small PNG: only the cap refuses it. Sparse,
# so that it takes no disk space.
HUGE_FILE_BYTES = 2**31


@pytest.mark.timeout(30)  # a FIFO used to block open() until a writer came
def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match=r"fifo.png: not a regular file \(a FIFO\)$"):
        load_image(fifo)
    with pytest.raises(ImageLoadError, match=r"zero.png: not a regular file \(a character device\)$"):
        load_image("/dev/zero", name="zero.png")
    link = tmp_path / "link.png"
    link.symlink_to("/dev/zero")
    with pytest.raises(ImageLoadError, match=r"link.png: not a regular file \(a character device\)$"):
        load_image(link)
    with pytest.raises(ImageLoadError, match=r"fifo.png: not a regular file"):
        open_image(fifo)


@measures_peak_memory
def test_image_files_over_the_byte_cap_are_refused_unread(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as file:
        file.write(encode(Image.new("RGB", (4, 4))))
        file.truncate(HUGE_FILE_BYTES)
    with peak_memory_growth() as growth:
        with pytest.raises(ImageLoadError, match=r"huge.png: 2,147,483,648 bytes, over the [\d,]+-byte limit"):
            load_image(path)
    assert growth[0] < HUGE_FILE_BYTES // 8  # the file was never read


@pytest.mark.timeout(30)
def test_a_file_swapped_for_a_fifo_after_the_check_cannot_hang_the_open(tmp_path, monkeypatch):
    """The check before opening passes (as if the name were a regular file until then); what is
    opened is a FIFO: the open must not block, and what was opened is checked again."""
    from prefixcap.system import files

    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    real_check, calls = files._check_regular, []

    def passes_once(mode):
        calls.append(mode)
        if len(calls) > 1:
            real_check(mode)

    monkeypatch.setattr(files, "_check_regular", passes_once)
    with pytest.raises(ImageLoadError, match=r"swapped.png: not a regular file \(a FIFO\)$"):
        load_image(fifo)
    assert len(calls) == 2
