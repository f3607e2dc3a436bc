"""CaptionModel files: round trips, references to frozen parts, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from prefixcap import CaptionModel
from prefixcap.errors import ModelLoadError
from prefixcap.model import registry
from tests.helpers_pipeline import subprocess_env
from tests.reference import naive_greedy, strip_padding

PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mapper", ["linear", "mlp", "transformer"])
def test_save_and_load_give_identical_outputs(tiny_components, tmp_path, mapper):
    torch.manual_seed(1)
    model = CaptionModel.from_components(
        *tiny_components, mapper=mapper, prefix_length=3, mapper_num_layers=2, mapper_num_heads=4
    ).eval()
    model.save_pretrained(tmp_path / "model")
    loaded = CaptionModel.from_pretrained(tmp_path / "model")
    assert loaded.config == model.config
    ids = torch.randint(0, 100, (3, 6))
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=PIXELS).logits
        actual = loaded(input_ids=ids, pixel_values=PIXELS).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert torch.equal(loaded.generate(PIXELS, max_new_tokens=8), model.generate(PIXELS, max_new_tokens=8))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json", "decoder", "image_processor", "mapper.safetensors", "tokenizer", "vision_encoder",
    ]  # fmt: skip


def test_frozen_parts_can_be_stored_as_references(tiny_components, tmp_path):
    model = CaptionModel.from_components(*tiny_components, mapper="linear", prefix_length=2, freeze_decoder=True)
    model.save_pretrained(tmp_path / "m", save_frozen=False)
    assert not (tmp_path / "m" / "decoder").exists() and not (tmp_path / "m" / "vision_encoder").exists()
    loaded = CaptionModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.generate(PIXELS, max_new_tokens=5), model.eval().generate(PIXELS, max_new_tokens=5))


def test_greedy_generation_matches_a_full_recompute_loop(tiny_model_dir):
    """KV-cached batched greedy decoding == ClipCap-style naive loop, token for token."""
    model = CaptionModel.from_pretrained(tiny_model_dir)
    embeds = model.encode_images(PIXELS)
    # Stop on the token the naive loop emits third for image 0, so rows stop at different steps.
    free_run = naive_greedy(model.decoder, model.prefix_embeds(embeds), 12, stop_ids=[])
    stop_ids = [model.tokenizer.eos_token_id, free_run[0][2]]
    expected = naive_greedy(model.decoder, model.prefix_embeds(embeds), 12, stop_ids)
    from prefixcap.engine import DecodeSpec, backends
    from prefixcap.options import GenerationOptions

    spec = DecodeSpec.of(
        GenerationOptions(max_new_tokens=12), eos_token_ids=stop_ids, pad_token_id=model.tokenizer.pad_token_id
    )
    ids = backends.generate(model.decoder, model.prefix_embeds(embeds), spec)
    assert strip_padding(ids, stop_ids) == expected
    assert torch.equal(
        model.generate(image_embeds=embeds, max_new_tokens=12), model.generate(PIXELS, max_new_tokens=12)
    )


def test_loss_ignores_prefix_and_padding(tiny_model_dir):
    model = CaptionModel.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 100, (2, 5))
    labels = ids.clone()
    labels[:, 3:] = -100
    out = model(input_ids=ids, labels=labels, pixel_values=PIXELS[:2])
    logits = out.logits[:, model.config.prefix_length - 1 : -1]  # position t predicts token t+1
    expected = torch.nn.functional.cross_entropy(logits[:, :3].reshape(-1, logits.shape[-1]), ids[:, :3].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("embed_dim", 999, "gives 24-d embeddings, but the mapper expects 999-d"),
        ("decoder_hidden_size", 64, "hidden size 32, but the mapper produces 64-d"),
    ],
)
def test_size_mismatches_are_clear_errors(tiny_model_dir, tmp_path, key, value, message):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config[key] = value
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        CaptionModel.from_pretrained(broken)


def test_image_embeds_from_another_encoder_are_refused(tiny_model_dir):
    model = CaptionModel.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="size 512, but this model's mapper expects 24"):
        model.generate(image_embeds=torch.zeros(1, 512))


@pytest.mark.parametrize("missing", ["config.json", "mapper.safetensors", "decoder", "tokenizer"])
def test_missing_files_are_clear_errors(tiny_model_dir, tmp_path, missing):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    target = broken / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelLoadError) as info:
        CaptionModel.from_pretrained(broken)
    assert "\n" not in str(info.value)
    assert str(broken) in str(info.value) or "gpt2" in str(info.value)


def test_unknown_directory_and_offline_names(tmp_path):
    with pytest.raises(ModelLoadError, match="not a prefixcap model directory"):
        CaptionModel.from_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError, match="not a local folder, nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    ):
        registry.load_model("someone/not-a-real-model")


def test_registered_name_offline_explains_itself(monkeypatch, tmp_path):
    """The fix is worded for the command line and for Python, where the error is raised too."""
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as error:
        registry.load_model("clipcap-coco")
    assert str(error.value) == (
        "clipcap-coco: akhaliq/CLIP-prefix-captioning-COCO-weights/coco_weights.pt is not in the Hugging Face "
        "cache, and HF_HUB_OFFLINE is set; connect once to download it, or load a local model directory instead "
        "(--model DIR on the command line, its path in Python)"
    )


def test_model_class_loads_directories_only(monkeypatch, tmp_path):
    """Names and hub ids go through the registry; the model class says so instead of resolving them."""
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path))
    for name in ["clipcap-coco", "someone/not-a-real-model"]:
        with pytest.raises(ModelLoadError, match=r"not a model directory; .*prefixcap\.load_model"):
            CaptionModel.from_pretrained(name)


def test_weights_are_safetensors_only(tiny_model_dir):
    assert not list(tiny_model_dir.rglob("*.bin")) and not list(tiny_model_dir.rglob("*.pt"))
    assert set(load_file(tiny_model_dir / "mapper.safetensors")) == {
        "mapper.model.0.weight", "mapper.model.0.bias", "mapper.model.2.weight", "mapper.model.2.bias",
    }  # fmt: skip


@pytest.mark.parametrize("options", [{"num_beams": 4}, {"do_sample": True, "top_k": 50, "seed": 3}])
def test_several_captions_are_distinct(tiny_model_dir, options):
    model = CaptionModel.from_pretrained(tiny_model_dir)
    ids = model.generate(PIXELS[:1], num_return_sequences=4, max_new_tokens=6, **options)
    assert ids.shape[0] == 4 and len({tuple(row) for row in ids.tolist()}) == 4


def test_push_to_hub_uploads_a_loadable_directory(tiny_model_dir, tmp_path, monkeypatch):
    """The upload is the same self-contained directory that from_pretrained reads (hub mocked)."""
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            shutil.copytree(folder_path, tmp_path / "hub")
            return f"https://hub/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = CaptionModel.from_pretrained(tiny_model_dir)
    assert model.push_to_hub("me/tiny").endswith("commit/1") and uploaded["repo"] == "me/tiny"
    reloaded = CaptionModel.from_pretrained(tmp_path / "hub")
    assert torch.equal(reloaded.generate(PIXELS, max_new_tokens=4), model.generate(PIXELS, max_new_tokens=4))


def test_any_causal_lm_can_be_the_decoder(tiny_components, tmp_path):
    """A non-GPT-2 decoder (tiny Llama) runs through HF `generate`, still equal to a naive loop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefixcap.testing import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    model = CaptionModel.from_components(tiny_components[0], tmp_path / "llama", mapper="linear", prefix_length=3)
    model.save_pretrained(tmp_path / "model")
    model = CaptionModel.from_pretrained(tmp_path / "model")
    stop_ids = model.stop_token_ids()
    expected = naive_greedy(model.decoder, model.prefix_embeds(model.encode_images(PIXELS)), 8, stop_ids)
    assert strip_padding(model.generate(PIXELS, max_new_tokens=8), stop_ids) == expected
    assert model.generate(PIXELS, num_beams=3, num_return_sequences=2, max_new_tokens=5).shape[0] == 6


# ---------------------------------------------------------------------- no remote code
# A component's config file -> what makes transformers offer to run the folder's own evil.py: an
# auto_map naming its classes, and a type transformers does not know (else it uses its own class).
CUSTOM_CODE = {
    "decoder/config.json": {
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}
    },
    "vision_encoder/config.json": {
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.Evil"}
    },
    "tokenizer/tokenizer_config.json": {
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    },
    "image_processor/preprocessor_config.json": {
        "image_processor_type": "EvilProcessor", "auto_map": {"AutoImageProcessor": "evil.EvilProcessor"}
    },
}  # fmt: skip


def with_custom_code(model_dir, out, config_file: str, marker) -> None:
    """A copy of `model_dir` whose `config_file` asks for custom code: an evil.py beside it that
    writes `marker` when imported."""
    shutil.copytree(model_dir, out)
    path = out / config_file
    path.write_text(json.dumps({**json.loads(path.read_text()), **CUSTOM_CODE[config_file]}))
    (path.parent / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")


@pytest.mark.parametrize("config_file", sorted(CUSTOM_CODE))
def test_a_component_asking_for_custom_code_is_refused_before_any_loader_runs(
    tiny_model_dir, tmp_path, monkeypatch, config_file
):
    """Answering transformers' "run the custom code? [y/N]" prompt with y ran the folder's Python:
    the config is refused in one line, and nothing asks (here `input` would answer y)."""
    import sys

    from transformers import dynamic_module_utils

    marker = tmp_path / "ran"
    with_custom_code(tiny_model_dir, tmp_path / "model", config_file, marker)
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # should code get copied
    monkeypatch.setattr(sys, "path", list(sys.path))
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(ModelLoadError, match="auto_map") as info:
        CaptionModel.from_pretrained(tmp_path / "model")
    assert str(tmp_path / "model" / config_file) in str(info.value) and "\n" not in str(info.value)
    assert not asked and not marker.exists()


def test_no_command_reads_stdin_or_runs_a_models_code(tiny_model_dir, tmp_path, example_images):
    """The CLI, as a user runs it: stdin holds "y" (what a user would answer) and then ends."""
    import os
    import subprocess
    import sys

    marker = tmp_path / "ran"
    with_custom_code(tiny_model_dir, tmp_path / "model", "decoder/config.json", marker)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "prefixcap", "caption", str(example_images[0]), "--model", str(tmp_path / "model")],
        input="y\n", capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and not marker.exists(), done.stderr
    assert "custom code" not in done.stdout and "[y/N]" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "auto_map" in errors[0], done.stderr


# ---------------------------------------------------------------------- foreign entries
def test_save_pretrained_refuses_or_keeps_what_it_did_not_write(tiny_model_dir, tmp_path):
    """A model folder is replaced only when it holds nothing but a model directory's entries;
    `keep_foreign=True` (training's best/) replaces the model and keeps the rest."""
    from prefixcap.errors import UserError

    model = CaptionModel.from_pretrained(tiny_model_dir)
    target = tmp_path / "best"
    model.save_pretrained(target)
    (target / "eval").mkdir()
    (target / "eval" / "results.json").write_text("[]")
    (target / "NOTES.md").write_text("notes")
    with pytest.raises(
        UserError, match=r"holds NOTES.md, eval, which a prefixcap model directory does not; refusing"
    ) as info:
        model.save_pretrained(target)
    assert "\n" not in str(info.value)
    assert (target / "eval" / "results.json").read_text() == "[]" and (target / "NOTES.md").read_text() == "notes"

    with torch.no_grad():
        next(model.mapper.parameters()).add_(1.0)
    model.save_pretrained(target, keep_foreign=True)
    assert (target / "eval" / "results.json").read_text() == "[]" and (target / "NOTES.md").read_text() == "notes"
    saved = load_file(target / "mapper.safetensors")
    assert all(torch.equal(saved[name], value) for name, value in model.mapper.state_dict().items())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best"]  # no staging or old copy left


def test_loading_from_python_shows_no_transformers_bars_or_load_reports(tiny_model_dir, tiny_components) -> None:
    """The CLI silences transformers for the whole process; a Python program keeps its own settings,
    and prefixcap's loads are quiet ("Loading weights" bars and a 30-line LOAD REPORT of the
    CLIP text tower's unused weights appeared on `Captioner.from_pretrained`)."""
    script = f"""
from transformers.utils import logging
from prefixcap import Captioner
from prefixcap.evaluation.clipscore import CLIPScorer
Captioner.from_pretrained({str(tiny_model_dir)!r})
CLIPScorer.from_pretrained({str(tiny_components[0])!r})
print(logging.get_verbosity() == logging.WARNING, logging.is_progress_bar_enabled())
"""
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]  # the program's own settings, unchanged
    assert "Loading weights" not in result.stderr and "LOAD REPORT" not in result.stderr, result.stderr
