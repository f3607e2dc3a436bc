"""An image processor's pipeline, split where each half is cheapest.

The CPU half (`pixels`) resizes and centre-crops in PIL's C code, which releases the GIL, and
returns uint8 pixels: a worker skips the processor's per-image Python and float NumPy work
(`benchmarks/bench_preprocess.py` measures the rates), and a batch crosses to the GPU in a quarter
of the bytes. The device half (`normalize`) rescales and normalises a whole batch with
one table lookup. Together they equal the Hugging Face processor's output bit for bit (a test
checks it; only ~600:1 banners differ, see MAX_RESIZED_PIXELS): the table holds, for each channel
and 8-bit level, exactly the float32 value that the processor's float64 rescale and float32
normalisation give.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from PIL import Image

from prefixcap.inputs.images import DEFAULT_MAX_PIXELS, ImageSource, load_image

# Resized images above this size (only images ~600 times longer than wide, at CLIP's 224 pixels)
# are resized in their cropped part alone, so that no input can make a worker allocate gigabytes.
MAX_RESIZED_PIXELS = 2**25


class Geometry(NamedTuple):
    """CLIP's and DINOv2's resize-then-crop: shortest side to `shortest_edge`, then a central
    crop; or, with `shortest_edge` None, SigLIP's resize of the whole image to the output size
    (aspect ratio not kept, nothing cropped)."""

    shortest_edge: int | None
    crop_height: int
    crop_width: int
    resample: int


class ImagePreprocessor:
    """Wraps a Hugging Face image processor (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`,
    DINOv2's `BitImageProcessorPil`, ...); picklable, so it can travel to DataLoader worker processes."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.geometry = _geometry(processor)
        self.lookup = _level_lookup(processor)

    def load_pixels(
        self,
        source: ImageSource,
        *,
        name: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
    ) -> torch.Tensor:
        """`pixels` of an image file, bytes or array (see `load_image`, which raises
        `ImageLoadError`). `jpeg_draft` decodes JPEGs at a reduced scale that still covers the
        model's input size (see `load_image`'s `min_size`)."""
        min_size = self.draft_size if jpeg_draft else None
        return self.pixels(load_image(source, max_pixels=max_pixels, name=name, min_size=min_size))

    @property
    def draft_size(self) -> int | None:
        """The smallest side a reduced-scale JPEG decode may have: the model's input size (None
        when the processor resizes by another rule)."""
        if self.geometry is None:
            return None
        size, crop_height, crop_width, _ = self.geometry
        return max(crop_height, crop_width) if size is None else size  # a squash keeps both sides

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every `pixels` output, when fixed (None: it depends on the image)."""
        return None if self.geometry is None else (self.geometry.crop_height, self.geometry.crop_width)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The resized and cropped RGB `image` as [3, H, W] uint8, ready for `normalize`."""
        if self.geometry is None:  # another resize rule: the processor's own, minus the float steps
            return self.processor(image, do_rescale=False, do_normalize=False, return_tensors="pt").pixel_values[0]
        size, crop_height, crop_width, resample = self.geometry
        if image.mode != "RGB":  # (converting an RGB image would copy it)
            image = image.convert("RGB")
        if size is None:  # a squash to the output size allocates nothing large, whatever the input
            return _as_tensor(image.resize((crop_width, crop_height), resample=resample))
        width, height = image.size
        # the processor's arithmetic: the short side becomes `size`, the long side is truncated
        if width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
        top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
        if new_width * new_height <= MAX_RESIZED_PIXELS:
            image = image.resize((new_width, new_height), resample=resample)
            image = image.crop((left, top, left + crop_width, top + crop_height))
        else:  # a 1-pixel-high banner would need gigabytes: resize only the part that the crop keeps
            x_scale, y_scale = width / new_width, height / new_height
            box = (left * x_scale, top * y_scale, (left + crop_width) * x_scale, (top + crop_height) * y_scale)
            image = image.resize((crop_width, crop_height), resample=resample, box=box)
        return _as_tensor(image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 model inputs from uint8 `pixels` [..., 3, H, W], on their device."""
        if pixels.dtype != torch.uint8:
            raise TypeError(
                "normalize takes uint8 pixels from pixels()/load_pixels(); image-processor output is "
                "normalised already: pass it as pixel_values="
            )
        lookup = self.lookup.to(pixels.device)
        offsets = torch.arange(0, lookup.numel(), 256, dtype=torch.int32, device=pixels.device).view(-1, 1, 1)
        return lookup.view(-1)[pixels.int() + offsets]


def _as_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as [3, H, W] uint8."""
    flat = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return flat.view(image.height, image.width, 3).permute(2, 0, 1)


def _geometry(processor: Any) -> Geometry | None:
    """The resize (and crop) settings when they are of a kind `pixels` reproduces: CLIP's and
    DINOv2's shortest-edge resize and centre crop, or SigLIP's fixed-size resize without a crop
    (else None: use the processor)."""
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    if not getattr(processor, "do_resize", False) or not size:
        return None
    if not getattr(processor, "do_center_crop", False):  # SigLIP: {"height", "width"}, nothing else
        others = ("shortest_edge", "longest_edge", "max_height", "max_width")
        if size.get("height") is None or size.get("width") is None or any(size.get(key) for key in others):
            return None
        return Geometry(None, int(size["height"]), int(size["width"]), int(processor.resample))
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest is None or longest is not None or crop.get("height") is None or crop.get("width") is None:
        return None
    if max(crop["height"], crop["width"]) > shortest:  # the processor would pad; leave that to it
        return None
    return Geometry(int(shortest), int(crop["height"]), int(crop["width"]), int(processor.resample))


def _level_lookup(processor: Any) -> torch.Tensor:
    """[3, 256] float32: what the processor's rescale and normalisation make of each level."""
    levels = torch.arange(256, dtype=torch.float64).expand(3, 256)
    if processor.do_rescale:  # HF rescales in float64, then casts to float32
        levels = levels * processor.rescale_factor
    levels = levels.float()
    if processor.do_normalize:  # then normalises in float32
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(-1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(-1, 1)
        levels = (levels - mean) / std
    return levels.contiguous()
