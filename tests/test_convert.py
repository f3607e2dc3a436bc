"""An imported ClipCap checkpoint behaves exactly like ClipCap's own forward pass."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel, GPT2LMHeadModel

from prefixcap import Captioner, CaptionModel
from prefixcap.errors import ModelLoadError
from tests.reference import PREFIX_LENGTH, make_clipcap_checkpoint, naive_greedy, strip_padding


class ClipCapReference:
    """ClipCap's forward, written independently: MLP -> view -> concat -> GPT-2."""

    def __init__(self, state, clip_dir, gpt2_dir):
        self.clip = CLIPModel.from_pretrained(clip_dir).eval()
        self.processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
        self.gpt = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
        self.gpt.load_state_dict(
            {
                k[4:]: v
                for k, v in state.items()
                if k.startswith("gpt.") and ".attn.bias" not in k and "masked_bias" not in k
            }
        )
        self.w0, self.b0 = state["clip_project.model.0.weight"], state["clip_project.model.0.bias"]
        self.w2, self.b2 = state["clip_project.model.2.weight"], state["clip_project.model.2.bias"]

    @torch.no_grad()
    def prefix(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor(image, return_tensors="pt").pixel_values
        feature = self.clip.get_image_features(pixel_values=pixels).pooler_output
        hidden = torch.tanh(feature @ self.w0.T + self.b0) @ self.w2.T + self.b2
        return hidden.view(1, PREFIX_LENGTH, -1)

    @torch.no_grad()
    def logits(self, image: Image.Image, tokens: torch.Tensor) -> torch.Tensor:
        embeds = torch.cat([self.prefix(image), self.gpt.transformer.wte(tokens)], dim=1)
        return self.gpt(inputs_embeds=embeds).logits


@pytest.fixture(scope="module")
def converted(tiny_components, tmp_path_factory):
    clip_dir, gpt2_dir = tiny_components
    root = tmp_path_factory.mktemp("clipcap")
    state = make_clipcap_checkpoint(gpt2_dir, root / "ckpt.pt")
    result = subprocess.run(
        [sys.executable, "-m", "prefixcap", "convert-clipcap", str(root / "ckpt.pt"), str(root / "model"),
         "--vision-encoder", str(clip_dir), "--decoder", str(gpt2_dir)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root / "model", ClipCapReference(state, clip_dir, gpt2_dir)


def test_converted_config(converted):
    model = CaptionModel.from_pretrained(converted[0])
    assert model.config.mapper == "mlp" and model.config.prefix_length == PREFIX_LENGTH
    assert model.config.stop_token == "." and model.config.generation["max_new_tokens"] == 67


def test_logits_match_clipcap_forward(converted, example_images):
    model_dir, reference = converted
    model = CaptionModel.from_pretrained(model_dir)
    image = Image.open(example_images[0]).convert("RGB")
    tokens = torch.tensor([[5, 17, 42, 8]])
    pixels = model.image_processor(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        ours = model(input_ids=tokens, pixel_values=pixels).logits
    torch.testing.assert_close(ours, reference.logits(image, tokens), rtol=1e-5, atol=1e-5)


def test_greedy_captions_match_clipcap_loop(converted, example_images):
    model_dir, reference = converted
    captioner = Captioner.from_pretrained(model_dir, device="cpu")
    model = captioner.model
    stop_ids = model.stop_token_ids()
    assert model.tokenizer.decode([stop_ids[1]]) == "."
    images = [Image.open(path).convert("RGB") for path in example_images]
    expected = [naive_greedy(reference.gpt, reference.prefix(image), 67, stop_ids)[0] for image in images]
    pixels = torch.stack([captioner.preprocess(image) for image in images])
    assert strip_padding(model.generate(pixels=pixels), stop_ids) == expected
    assert [c[0] for c in captioner(images)] == [
        " ".join(model.tokenizer.decode(ids, skip_special_tokens=True).split()) for ids in expected
    ]


def test_non_clipcap_files_are_refused(tmp_path, tiny_components):
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="other.pt: not a ClipCap MLP checkpoint"):
        from prefixcap.model.clipcap import convert_clipcap

        convert_clipcap(
            tmp_path / "other.pt",
            tmp_path / "out",
            vision_encoder=str(tiny_components[0]),
            decoder=str(tiny_components[1]),
        )
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "prefixcap", "convert-clipcap", str(tmp_path / "garbage.pt"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "garbage.pt" in result.stderr
    assert "Traceback" not in result.stderr


def test_registered_names_download_convert_and_cache(tiny_components, tmp_path, monkeypatch):
    """`clipcap-coco` resolves through hf_hub_download + convert-clipcap, once; later loads hit the cache."""
    import huggingface_hub

    from prefixcap.model import registry

    clip_dir, gpt2_dir = tiny_components
    make_clipcap_checkpoint(gpt2_dir, tmp_path / "coco_weights.pt")
    downloads = []

    def fake_download(repo_id, filename):
        downloads.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    spec = registry.REGISTRY["clipcap-coco"]
    monkeypatch.setitem(
        registry.REGISTRY, "clipcap-coco",
        registry.PretrainedSpec(spec.repo_id, spec.filename, str(clip_dir), str(gpt2_dir), spec.description),
    )  # fmt: skip
    first = registry.load_model("clipcap-coco")
    second = registry.load_model("clipcap-coco")
    assert downloads == [("akhaliq/CLIP-prefix-captioning-COCO-weights", "coco_weights.pt")]
    assert (tmp_path / "cache" / "clipcap-coco" / "config.json").is_file()
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(first.generate(pixels), second.generate(pixels))


def test_overwrite_never_deletes_what_the_user_keeps_in_a_model_directory(tiny_components, tmp_path, capsys):
    """`convert-clipcap --overwrite` deleted a NOTES.md and an ONNX export kept
    inside the model folder. A model folder is recognised by its exact contents: one holding
    anything else is refused in one line, and nothing in it changes."""
    from prefixcap.cli import main

    clip_dir, gpt2_dir = tiny_components
    make_clipcap_checkpoint(gpt2_dir, tmp_path / "ckpt.pt")
    out = tmp_path / "model"
    argv = ["convert-clipcap", str(tmp_path / "ckpt.pt"), str(out), "--vision-encoder", str(clip_dir),
            "--decoder", str(gpt2_dir), "--overwrite"]  # fmt: skip
    assert main(argv) == 0
    (out / "NOTES.md").write_text("how this model was made")
    (out / "onnx").mkdir()
    (out / "onnx" / "prefixcap_onnx.json").write_text("{}")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds NOTES.md, onnx, which a prefixcap model directory does not" in errors[0]
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt.pt", "model"]  # no staging left


def test_max_new_tokens_lets_a_decoder_with_few_positions_convert(tiny_components, tmp_path):
    """ClipCap decodes up to 67 tokens, more than a decoder with 48 positions has room for after the
    prefix: convert-clipcap refused it with no way out. --max-new-tokens sets the default."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefixcap.testing import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "gpt2")
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=48, bos_token_id=eos,
                        eos_token_id=eos)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    make_clipcap_checkpoint(tmp_path / "gpt2", tmp_path / "ckpt.pt")
    command = [sys.executable, "-m", "prefixcap", "convert-clipcap", str(tmp_path / "ckpt.pt"), str(tmp_path / "out"),
               "--vision-encoder", str(tiny_components[0]), "--decoder", str(tmp_path / "gpt2")]  # fmt: skip
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 2 and "--max-new-tokens" in refused.stderr.splitlines()[-1], refused.stderr
    converted = subprocess.run([*command, "--max-new-tokens", "40"], capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    model = CaptionModel.from_pretrained(tmp_path / "out")
    assert model.config.generation["max_new_tokens"] == 40 and model.config.stop_token == "."
