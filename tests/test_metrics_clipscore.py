"""CLIPScore / RefCLIPScore: the formula on known vectors, and the scorer on a tiny real CLIP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prefixcap.errors import UserError
from prefixcap.evaluation.clipscore import PROMPT, CLIPScorer, clip_s, ref_clip_s


@pytest.fixture(scope="module")
def clip_dir(tiny_components: tuple[Path, Path]) -> Path:
    return tiny_components[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four plain-colour images: random CLIP weights see colour."""
    folder = tmp_path_factory.mktemp("clipscore-images")
    paths = []
    for name, color in {
        "red": (220, 20, 20),
        "green": (30, 170, 40),
        "blue": (30, 60, 220),
        "white": (250, 250, 250),
    }.items():
        Image.new("RGB", (40, 40), color).save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


def test_clip_s_on_known_vectors() -> None:
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    texts = torch.tensor([[2.0, 2.0], [-1.0, 0.5], [0.0, 0.1]])
    # cos = 1/sqrt(2); negative -> 0; parallel -> 1, whatever the norms.
    assert clip_s(images, texts).tolist() == pytest.approx([2.5 / math.sqrt(2), 0.0, 2.5])


def test_ref_clip_s_on_known_vectors() -> None:
    captions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    references = [
        torch.tensor([[0.0, 1.0], [1.0, 1.0]]),  # best cos 1/sqrt(2)
        torch.tensor([[0.0, -1.0]]),  # cos -1, clipped to 0
        torch.tensor([[5.0, 0.0]]),  # cos 1
    ]
    clip = torch.tensor([0.8, 0.9, 0.0])
    ref = 1 / math.sqrt(2)
    expected = [2 * 0.8 * ref / (0.8 + ref), 0.0, 0.0]  # harmonic means; 0 when a term is 0
    assert ref_clip_s(clip, captions, references).tolist() == pytest.approx(expected)


def test_scores_match_a_hand_computation_with_the_model(clip_dir: Path, images: list[Path]) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    scorer = CLIPScorer.from_pretrained(str(clip_dir), device="cpu", batch_size=3)  # batches of 3 and 1
    captions = ["a red square", "a green field", "blue sky", "snow"]
    references = [["a red square", "red"], ["grass"], ["a blue sky", "water", "sky"], ["white"]]
    result = scorer.score(images, captions, references)

    # The same numbers straight from the model's own feature functions.
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(clip_dir), CLIPImageProcessorPil.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt").pixel_values
        image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
        text = tokenizer([PROMPT + c for c in captions], padding=True, return_tensors="pt")
        text_embeds = model.get_text_features(**text).pooler_output
    cos = F.cosine_similarity(image_embeds, text_embeds)
    assert (cos > 0).any()  # the check below is not only about clipping
    assert result.clip_s.tolist() == pytest.approx((2.5 * cos.clamp(min=0)).tolist(), abs=1e-5)

    # The first caption equals one of its references: the reference term is exactly 1.
    c = result.clip_s[0].item()
    assert result.ref_clip_s[0].item() == pytest.approx(2 * c / (c + 1), abs=1e-5)
    assert result.summary()["CLIPScore"] == pytest.approx(result.clip_s.mean().item())


def test_unreadable_images_are_left_out(clip_dir: Path, images: list[Path], capsys: pytest.CaptureFixture) -> None:
    scorer = CLIPScorer.from_pretrained(str(clip_dir), device="cpu")
    result = scorer.score([images[0], images[0].with_name("missing.png")], ["red", "red"])
    assert not math.isnan(result.clip_s[0]) and math.isnan(result.clip_s[1])
    assert result.summary()["CLIPScore"] == pytest.approx(result.clip_s[0].item())
    assert "left out 1 unreadable image(s)" in capsys.readouterr().err


def test_a_vision_only_model_is_refused(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a full CLIP with a text tower"):
        CLIPScorer.from_pretrained(str(tmp_path), device="cpu")


def test_a_clip_asking_for_custom_code_is_refused_and_never_run(
    clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--clip-model and --reward-clip load with trust_remote_code=False, and a config
    with auto_map is refused before transformers could ask on stdin to run the folder's Python."""
    import json
    import shutil
    import sys

    from transformers import dynamic_module_utils

    clip = Path(shutil.copytree(clip_dir, tmp_path / "clip"))
    marker = tmp_path / "ran"
    config = json.loads((clip / "config.json").read_text())
    custom = {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.Evil"}}
    (clip / "config.json").write_text(json.dumps({**config, **custom}))
    (clip / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(UserError, match="auto_map"):
        CLIPScorer.from_pretrained(str(clip), device="cpu")
    assert not asked and not marker.exists()
