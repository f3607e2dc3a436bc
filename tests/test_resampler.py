"""The resampler mapper (K learned queries over the encoder's patch tokens) and patch features in
the store: prepare --features patches, train --mapper resampler, caption and reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefixcap import Captioner, CaptionModel
from prefixcap.cli import main
from prefixcap.data import load_records
from prefixcap.data.synth import make_synthetic_dataset
from prefixcap.errors import ModelLoadError
from prefixcap.model.config import SIZE_LIMITS, CaptionConfig
from prefixcap.model.mappers import PrefixMapper, ResamplerMapper
from prefixcap.pipeline.features import FeatureStore

NUM_IMAGES = 20


# ---------------------------------------------------------------------- the mapper
def test_resampler_maps_any_number_of_patch_tokens_to_k_prefix_embeddings() -> None:
    torch.manual_seed(0)
    mapper = ResamplerMapper(patch_dim=12, hidden_size=20, prefix_length=3, width=16, num_layers=2, num_heads=4)
    for tokens in (1, 7, 49):
        patches = torch.randn(2, tokens, 12, requires_grad=True)
        prefix = mapper(patches)
        assert prefix.shape == (2, 3, 20)
    prefix.sum().backward()
    assert patches.grad.abs().sum() > 0 and mapper.queries.grad.abs().sum() > 0
    # each image's prefix depends on its own patches only
    patches = torch.randn(2, 5, 12)
    assert torch.allclose(mapper(patches)[1], mapper(patches[1:])[0], atol=1e-6)


def test_resampler_config_checks_width_and_heads() -> None:
    config = CaptionConfig(mapper="resampler", embed_dim=32, decoder_hidden_size=48, mapper_num_heads=4)
    assert config.uses_patches and config.resampler_width == 48 and not CaptionConfig().uses_patches
    assert PrefixMapper(config)(torch.randn(2, 9, 32)).shape == (2, config.prefix_length, 48)
    with pytest.raises(ModelLoadError, match="width 30 .* not divisible by mapper_num_heads 4"):
        CaptionConfig(mapper="resampler", mapper_width=30, mapper_num_heads=4)
    with pytest.raises(ModelLoadError, match=rf"mapper_width must be in \[1, {SIZE_LIMITS['mapper_width']}\]"):
        CaptionConfig(mapper="resampler", mapper_width=0)


# ---------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def resampler_model(tiny_components) -> CaptionModel:
    torch.manual_seed(0)
    return CaptionModel.from_components(*tiny_components, mapper="resampler", prefix_length=3, mapper_num_layers=2)


def test_resampler_model_reads_patch_tokens_everywhere(resampler_model: CaptionModel, example_images) -> None:
    model = resampler_model
    assert model.config.embed_dim == model.vision_encoder.patch_dim == 32  # not CLIP's 24-d projection
    pixels = torch.stack([model.preprocessor.load_pixels(path) for path in example_images[:2]])
    patches = model.encode_pixels(pixels)
    assert patches.shape == (2, 16, 32)
    values = model.preprocessor.normalize(pixels)
    assert torch.equal(model.encode_images(values), patches)
    options = {"max_new_tokens": 5}
    assert model.caption(pixels=pixels, **options) == model.caption(image_embeds=patches, **options)
    pooled = model.vision_encoder(values)
    with pytest.raises(ValueError, match=r"shape \(2, 24\), but this model's resampler mapper reads patch tokens"):
        model.caption(image_embeds=pooled)


def test_resampler_model_saves_and_reloads_to_identical_outputs(resampler_model, example_images, tmp_path) -> None:
    resampler_model.save_pretrained(tmp_path / "model")
    reloaded = CaptionModel.from_pretrained(tmp_path / "model")
    assert reloaded.config == resampler_model.config
    pixels = torch.stack([resampler_model.preprocessor.load_pixels(path) for path in example_images[:2]])
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        expected = resampler_model(input_ids=ids, pixels=pixels).logits
        assert torch.equal(reloaded(input_ids=ids, pixels=pixels).logits, expected)
    assert reloaded.caption(pixels=pixels, max_new_tokens=5) == resampler_model.caption(pixels=pixels, max_new_tokens=5)


# ---------------------------------------------------------------------- the store, training and captioning
@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_images=NUM_IMAGES, image_size=16)


@pytest.fixture(scope="module")
def patch_store(synth_data: Path, tiny_components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("patches") / "features"
    args = ["prepare", synth_data, "--out", out, "--vision-encoder", tiny_components[0], "--workers", "0"]
    assert main([str(arg) for arg in [*args, "--features", "patches"]]) == 0
    return out


def test_prepare_patches_states_the_size_and_stores_patch_tokens(synth_data, tiny_components, tmp_path, capsys):
    out = tmp_path / "features"
    args = ["prepare", synth_data, "--out", out, "--vision-encoder", tiny_components[0], "--workers", "0"]
    assert main([str(arg) for arg in [*args, "--features", "patches", "--batch-size", "7", "--shard-size", "6"]]) == 0
    captured = capsys.readouterr()
    # 20 images x 16 tokens (32x32 inputs, 8-pixel patches) x 32 wide x 2 bytes, said before encoding
    assert f"{NUM_IMAGES} images x 16 tokens x 32 x 2 bytes = 20.5 KB" in captured.err
    assert "as 16 patch tokens each" in captured.out
    manifest = json.loads((out / "store.json").read_text())
    assert (manifest["features"], manifest["num_patches"], manifest["embed_dim"]) == ("patches", 16, 32)
    store = FeatureStore(out)
    stored = store.embeddings()
    assert stored.dtype == torch.float16 and stored.shape == (NUM_IMAGES, 16, 32)
    size_on_disk = sum(path.stat().st_size for path in (out / "shards").glob("*.safetensors"))
    assert NUM_IMAGES * 16 * 32 * 2 <= size_on_disk < NUM_IMAGES * 16 * 32 * 2 + 4 * 4096  # 4 shards

    # memory-mapped rows (what training reads) equal the loaded ones, across shards and splits
    for split in (None, "train", "val"):
        loaded, mapped = store.embeddings(split), store.embeddings(split, mmap=True)
        assert mapped.shape == loaded.shape and len(mapped) == len(loaded)
        index = torch.tensor([len(loaded) - 1, 0, 1, len(loaded) - 1])
        assert torch.equal(mapped[index], loaded[index]) and torch.equal(mapped[1:], loaded[1:])

    model = CaptionModel.from_components(*tiny_components, mapper="resampler", mapper_num_layers=1)
    store.check_encoder(model.config, model.image_processor)
    pixels = torch.stack([model.preprocessor.load_pixels(record.image) for record in store.records()])
    # (other batch sizes than the store's: equal up to float16 rounding)
    torch.testing.assert_close(stored.float(), model.encode_pixels(pixels), atol=2e-3, rtol=2e-3)


def test_train_a_resampler_on_patches_then_caption_through_the_cli(
    patch_store, synth_data, tiny_components, tmp_path, capsys, one_thread
) -> None:
    run = tmp_path / "run"
    args = ["train", patch_store, "--decoder", tiny_components[1], "--out", run, "--mapper", "resampler",
            "--prefix-length", "3", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--val-images", "2"]  # fmt: skip
    assert main([str(arg) for arg in args]) == 0
    model = CaptionModel.from_pretrained(run / "best")
    assert model.config.mapper == "resampler" and model.config.embed_dim == 32

    test = [record for record in load_records(synth_data) if record.split == "test"]
    capsys.readouterr()
    args = ["caption", *[record.image for record in test], "--model", run / "best", "--format", "jsonl"]
    assert main([str(arg) for arg in [*args, "--max-new-tokens", "5"]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = Captioner.from_pretrained(run / "best")([record.image for record in test], max_new_tokens=5)
    assert [line["caption"] for line in lines] == [captions[0] for captions in expected]


def test_a_mapper_refuses_a_store_of_the_other_kind(patch_store, synth_data, tiny_components, tmp_path, capsys):
    base = ["--decoder", tiny_components[1], "--epochs", "1", "--val-images", "0", "--best-metric", "loss"]
    assert main([str(arg) for arg in ["train", patch_store, "--out", tmp_path / "a", "--mapper", "mlp", *base]]) == 2
    error = capsys.readouterr().err
    assert "holds patch tokens, but the mlp mapper reads pooled embeddings; train with --mapper resampler" in error

    pooled = tmp_path / "pooled"
    args = ["prepare", synth_data, "--out", pooled, "--vision-encoder", tiny_components[0], "--workers", "0"]
    assert main([str(arg) for arg in args]) == 0
    capsys.readouterr()
    args = ["train", pooled, "--out", tmp_path / "b", "--mapper", "resampler", *base]
    assert main([str(arg) for arg in args]) == 2
    error = capsys.readouterr().err
    assert "holds pooled embeddings, but the resampler mapper reads patch tokens" in error
    assert "prefixcap prepare ... --features patches" in error and len(error.strip().splitlines()) == 1
