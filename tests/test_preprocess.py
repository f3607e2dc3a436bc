"""The split image pipeline (uint8 on the CPU, normalisation on the device) against the Hugging
Face processor it replaces: equal bit for bit, for CLIP's resize-and-crop and for other rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BitImageProcessorPil, CLIPImageProcessorPil, SiglipImageProcessorPil

from prefixcap.inputs.images import load_image
from prefixcap.inputs.preprocess import ImagePreprocessor

SHAPES = [(480, 640), (640, 480), (224, 224), (301, 517), (1, 300), (10, 10), (225, 223)]
PROCESSORS = {
    "clip": {},
    "other crop, resample and statistics": dict(
        size={"shortest_edge": 64},
        crop_size={"height": 48, "width": 60},
        resample=Image.BILINEAR,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.3, 0.25],
    ),
    "no normalisation": dict(do_normalize=False),
    "fixed size (the processor's own resize)": dict(size={"height": 50, "width": 70}),
}
# The other encoder families' processors, with their hub checkpoints' settings.
OTHER_PROCESSORS = {
    "siglip (square resize, no crop, mean and std 0.5)": lambda: SiglipImageProcessorPil(),
    "siglip 384": lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384}),
    "dinov2 (shortest edge 256, crop 224, ImageNet statistics)": lambda: BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ),  # fmt: skip
}


def _processors() -> list:
    """The parameters as a list: pytest will stop taking a generator."""
    clip = [pytest.param(lambda s=s: CLIPImageProcessorPil(**s), id=name) for name, s in PROCESSORS.items()]
    return clip + [pytest.param(make, id=name) for name, make in OTHER_PROCESSORS.items()]


@pytest.mark.parametrize("make_processor", _processors())
def test_split_pipeline_equals_the_processor(make_processor):
    processor = make_processor()
    preprocessor = ImagePreprocessor(processor)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)) for shape in SHAPES]
    images.append(Image.fromarray(rng.integers(0, 256, (200, 300), dtype=np.uint8)))  # greyscale
    for image in images:
        pixels = preprocessor.pixels(image)
        assert pixels.dtype == torch.uint8
        expected = processor(image, return_tensors="pt").pixel_values
        assert torch.equal(preprocessor.normalize(pixels.unsqueeze(0)), expected), image.size


def test_float_pixels_are_refused():
    """uint8 pixels and an image processor's normalised floats never share a parameter."""
    preprocessor = ImagePreprocessor(CLIPImageProcessorPil())
    with pytest.raises(TypeError, match="pass it as pixel_values="):
        preprocessor.normalize(torch.randn(2, 3, 224, 224))


def test_jpeg_draft_pixels_stay_close_to_a_full_decode(tmp_path):
    """Draft decoding (DCT-domain downscaling) changes pixels only slightly: on a photo-like
    1920x1080 JPEG, by about one level in 255 on average after CLIP's resize and crop."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:1080, 0:1920]
    photo = np.stack([x // 8 % 256, y // 5 % 256, (x + y) // 12 % 256], axis=-1) + rng.normal(0, 10, (1080, 1920, 3))
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(path, quality=90)
    preprocessor = ImagePreprocessor(CLIPImageProcessorPil())

    full = preprocessor.load_pixels(path)
    draft = preprocessor.load_pixels(path, jpeg_draft=True)

    assert load_image(path, min_size=224).size == (480, 270)  # decoded at 1/4 scale
    difference = (full.float() - draft.float()).abs()
    assert draft.shape == full.shape and 0 < difference.mean() < 3


def test_extremely_elongated_images_are_resized_within_bounded_memory():
    """A 200,000x1 banner would become 224 x 44.8 million pixels before the crop (10 GB): only the
    part the crop keeps is resized."""
    preprocessor = ImagePreprocessor(CLIPImageProcessorPil())
    pixels = preprocessor.pixels(Image.new("RGB", (200_000, 1), (10, 20, 30)))
    assert pixels.shape == (3, 224, 224)
    assert pixels.flatten(1).unique(dim=1).tolist() == [[10], [20], [30]]


def test_the_fast_path_covers_every_encoder_family():
    """CLIP's, SigLIP's and DINOv2's processors are reproduced by `pixels` itself (PIL resize and
    crop), not by the processor's slower own pipeline, and say their fixed output size."""
    for make in [CLIPImageProcessorPil, *OTHER_PROCESSORS.values()]:
        processor = make()
        preprocessor = ImagePreprocessor(processor)
        assert preprocessor.geometry is not None, type(processor).__name__
        assert preprocessor.output_size == tuple(preprocessor.pixels(Image.new("RGB", (300, 200))).shape[1:])


def test_square_resize_bounds_memory_and_drafts_at_the_output_size():
    """SigLIP squashes the whole image: a banner needs no crop trick, and a JPEG draft keeps both
    sides at least the output size."""
    preprocessor = ImagePreprocessor(SiglipImageProcessorPil(size={"height": 64, "width": 96}))
    assert preprocessor.pixels(Image.new("RGB", (200_000, 1))).shape == (3, 64, 96)
    assert preprocessor.draft_size == 96
