"""The newer model combinations learn: tiny random encoders and decoders, trained through the CLI
on the synthetic colour task, caption held-out images exactly (the learnability bar: 90%).

- SigLIP + resampler (patch tokens) + Llama with LoRA: every new part at once.
- CLIP + MLP + Qwen2, fully fine-tuned: a Llama-family decoder in ClipCap's own design.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefixcap.captioner import Captioner
from prefixcap.cli import main
from prefixcap.data import load_records
from prefixcap.testing import build_decoder, build_learnable_components
from tests.helpers_pipeline import exact_matches

pytestmark = pytest.mark.slow

# Learnable tiny decoders: dropout-free, with HF's default initialisation (the engine tests' wide
# 0.2 initialisation makes greedy outputs vary; here the model has to learn).
LEARNABLE = {"initializer_range": 0.02, "attention_dropout": 0.0}


def build_siglip_64(directory: Path) -> Path:
    """A random SigLIP with 64-d patch tokens (the 32-d test tower's patches separate the colours less well)."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    torch.manual_seed(0)
    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {**tower, "vocab_size": 400, "max_position_embeddings": 16, "pad_token_id": 1, "eos_token_id": 1}
    SiglipModel(
        SiglipConfig(text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8})
    ).save_pretrained(directory)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def held_out_exact(data: Path, model_dir: Path) -> tuple[int, int]:
    test = [record for record in load_records(data / "captions.jsonl") if record.split == "test"]
    captions = Captioner.from_pretrained(model_dir, dtype="float32")([record.image for record in test])
    return exact_matches(captions, [record.captions[0] for record in test]), len(test)


def synth_and_prepare(tmp_path: Path, encoder: Path, *extra: str) -> tuple[Path, Path]:
    data, features = tmp_path / "data", tmp_path / "features"
    assert main(["synth", str(data), "--num-images", "600", "--seed", "0"]) == 0
    assert main(["prepare", str(data / "captions.jsonl"), "--out", str(features), "--vision-encoder", str(encoder),
                 "--workers", "0", *extra]) == 0  # fmt: skip
    return data, features


def test_siglip_resampler_llama_with_lora_learns(tmp_path: Path, one_thread) -> None:
    siglip = build_siglip_64(tmp_path / "siglip")
    llama = build_decoder(tmp_path / "llama", "llama", **LEARNABLE)
    data, features = synth_and_prepare(tmp_path, siglip, "--features", "patches")
    run = tmp_path / "run"
    assert main(["train", str(features), "--decoder", str(llama), "--out", str(run), "--mapper", "resampler",
                 "--prefix-length", "4", "--mapper-layers", "2", "--freeze", "lora", "--lora-rank", "8",
                 "--epochs", "30", "--batch-size", "16", "--lr", "3e-3", "--val-images", "60", "--seed", "0"]) == 0  # fmt: skip
    assert (run / "best" / "decoder_adapter").is_dir() and not (run / "best" / "decoder").exists()
    exact, total = held_out_exact(data, run / "best")
    print(f"SigLIP + resampler + Llama (LoRA r=8): {exact}/{total} exact on held-out images")
    assert exact >= 0.9 * total, f"{exact}/{total} exact"


def test_clip_mlp_qwen2_learns(tmp_path: Path, one_thread) -> None:
    clip, _ = build_learnable_components(tmp_path / "models")
    qwen2 = build_decoder(tmp_path / "qwen2", "qwen2", **LEARNABLE)
    data, features = synth_and_prepare(tmp_path, clip)
    run = tmp_path / "run"
    assert main(["train", str(features), "--decoder", str(qwen2), "--out", str(run), "--mapper", "mlp",
                 "--prefix-length", "4", "--epochs", "30", "--batch-size", "16", "--lr", "3e-3",
                 "--val-images", "60", "--seed", "0"]) == 0  # fmt: skip
    exact, total = held_out_exact(data, run / "best")
    print(f"CLIP + MLP + Qwen2: {exact}/{total} exact on held-out images")
    assert exact >= 0.9 * total, f"{exact}/{total} exact"


def test_the_image_dependent_test_model_tells_images_apart(image_dependent_model_dir: Path, example_images) -> None:
    """The suite's model for comparing captions across paths: each colour it was taught gets its own
    caption, and the example photos get different captions from each other."""
    from prefixcap.testing import COLOURS, colour_captions, colour_image

    captioner = Captioner.from_pretrained(image_dependent_model_dir, device="cpu", dtype="float32")
    taught = [captions[0] for captions in captioner([colour_image(name) for name in COLOURS])]
    assert sum(got == want for got, want in zip(taught, colour_captions().values())) >= 6, taught
    photos = [captions[0] for captions in captioner([str(path) for path in example_images])]
    assert len(set(photos)) == len(photos), photos
