"""Image encoders (CLIP, SigLIP, DINOv2): one interface, pixels equal to each family's Hugging Face
processor, embeddings equal to the Hugging Face model's own outputs, and caption models on each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, CLIPModel, Siglip2Config, SiglipModel

from prefixcap import CaptionModel
from prefixcap.errors import ModelLoadError
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.encoders import ImageEncoder, load_image_encoder, load_image_processor
from prefixcap.testing import build_clip, build_dinov2, build_siglip

BUILDERS = {
    "clip": build_clip,
    "siglip": build_siglip,
    "dinov2": build_dinov2,
    "dinov2_with_registers": lambda out: build_dinov2(out, registers=4),
}
SHAPES = [(40, 40), (37, 90), (120, 31), (1, 200), (64, 48)]


@pytest.fixture(scope="module", params=BUILDERS)
def encoder_dir(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)) for shape in SHAPES]


def _hf_outputs(name: str, directory: Path, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, patch tokens) as the Hugging Face classes users know give them, on the full checkpoint."""
    with torch.no_grad():
        if name == "clip":
            model = CLIPModel.from_pretrained(directory)  # get_image_features: the projected pooled output
            out = model.vision_model(pixel_values=pixel_values)
            return model.visual_projection(out.pooler_output), out.last_hidden_state[:, 1:]
        if name == "siglip":
            out = SiglipModel.from_pretrained(directory).vision_model(pixel_values=pixel_values)
            return out.pooler_output, out.last_hidden_state
        model = AutoModel.from_pretrained(directory)
        out = model(pixel_values=pixel_values)
        return out.pooler_output, out.last_hidden_state[:, 1 + getattr(model.config, "num_register_tokens", 0) :]


def test_pixels_and_embeddings_equal_the_hugging_face_ones(encoder_dir) -> None:
    name, directory = encoder_dir
    encoder, processor = load_image_encoder(directory), load_image_processor(directory)
    assert isinstance(encoder, ImageEncoder) and encoder.family == name.split("_")[0]
    assert type(processor).__name__.endswith("Pil")
    preprocessor = ImagePreprocessor(processor)
    assert preprocessor.geometry is not None  # the fast uint8 path, not the processor's own
    images = _images()
    pixels = torch.stack([preprocessor.pixels(image) for image in images])
    expected_values = processor(images, return_tensors="pt").pixel_values
    assert torch.equal(preprocessor.normalize(pixels), expected_values)

    pooled, patches = _hf_outputs(name, directory, expected_values)
    with torch.no_grad():
        assert torch.equal(encoder(expected_values), pooled)
        assert torch.equal(encoder(expected_values, patches=True), patches)
    assert pooled.shape == (len(images), encoder.embed_dim)
    assert patches.shape == (len(images), 16, encoder.patch_dim)  # 32x32 inputs, 8-pixel patches
    assert encoder.spec.num_patches(32, 32) == 16


def test_caption_model_on_each_family_saves_reloads_and_captions(encoder_dir, tiny_components, tmp_path) -> None:
    name, directory = encoder_dir
    torch.manual_seed(0)
    model = CaptionModel.from_components(directory, tiny_components[1], mapper="mlp", prefix_length=3)
    assert model.config.embed_dim == model.vision_encoder.embed_dim
    model.save_pretrained(tmp_path / "model")
    reloaded = CaptionModel.from_pretrained(tmp_path / "model")
    assert reloaded.vision_encoder.family == name.split("_")[0]
    pixels = torch.stack([model.preprocessor.pixels(image) for image in _images()[:2]])
    options = {"max_new_tokens": 5}
    assert torch.equal(reloaded.encode_pixels(pixels), model.encode_pixels(pixels))
    captions = reloaded.caption(pixels=pixels, **options)
    assert captions == model.caption(pixels=pixels, **options) and len(captions) == 2


def test_encoder_saves_as_a_vision_only_checkpoint_that_loads_back(encoder_dir, tmp_path) -> None:
    _, directory = encoder_dir
    encoder = load_image_encoder(directory)
    encoder.save_pretrained(tmp_path / "tower")
    again = load_image_encoder(tmp_path / "tower")
    values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert again.spec == encoder.spec and torch.equal(again(values), encoder(values))
    assert (encoder.dtype, encoder.device) == (torch.float32, torch.device("cpu"))


def test_other_checkpoints_are_refused_in_one_line(tiny_components, tmp_path) -> None:
    Siglip2Config().save_pretrained(tmp_path / "naflex")
    with pytest.raises(ModelLoadError, match="SigLIP 2 NaFlex checkpoints .* are not supported"):
        load_image_encoder(tmp_path / "naflex")
    with pytest.raises(
        ModelLoadError, match="expected a CLIP, SigLIP or DINOv2 image encoder, found model_type 'gpt2'"
    ):
        load_image_encoder(tiny_components[1])


def test_a_full_siglip_checkpoint_keeps_its_text_tower(tmp_path) -> None:
    """build_siglip writes both towers (for CLIP-S-style rewards later); the encoder reads the vision one."""
    directory = build_siglip(tmp_path / "siglip")
    assert SiglipModel.from_pretrained(directory).text_model.config.hidden_size == 32
