"""Model directories: no folder deleted that prefixcap did not create, readable permissions, and
one clear line for every damaged, inconsistent or non-finite file."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixcap import CaptionModel
from prefixcap.cli import main
from prefixcap.errors import ModelLoadError, UserError
from prefixcap.model.clipcap import convert_clipcap
from prefixcap.model.config import CaptionConfig
from prefixcap.model.mappers import PrefixMapper
from tests.reference import make_clipcap_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tiny_components, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    make_clipcap_checkpoint(tiny_components[1], path)
    return path


def convert(checkpoint: Path, out: Path, components, **kwargs) -> CaptionModel:
    clip_dir, gpt2_dir = components
    return convert_clipcap(checkpoint, out, vision_encoder=str(clip_dir), decoder=str(gpt2_dir), **kwargs)


def foreign_folder(path: Path) -> Path:
    """A user's folder, which no command may delete."""
    (path / "photos").mkdir(parents=True)
    (path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    (path / "thesis.txt").write_text("years of work")
    return path


def assert_untouched(path: Path) -> None:
    assert (path / "thesis.txt").read_text() == "years of work" and (path / "photos" / "cat.jpg").is_file()


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


WEIGHT_FILES = ["mapper.safetensors", "decoder/model.safetensors", "vision_encoder/model.safetensors"]


def broken_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    return model_dir


def named(model_dir: Path, file: str) -> Path:
    """What an error names: the mapper's own file, or the component folder transformers loads."""
    return model_dir / file if "/" not in file else model_dir / Path(file).parent


def edit_json(path: Path, **changes) -> None:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


# ---------------------------------------------------------------------- nothing deleted that we did not create
def test_convert_refuses_a_folder_that_is_not_a_model_directory(checkpoint, tiny_components, tmp_path):
    out = foreign_folder(tmp_path / "out")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is not empty and is not a prefixcap model directory") as error:
            convert(checkpoint, out, tiny_components, overwrite=overwrite)
        assert str(out) in one_line(error)
        assert_untouched(out)


def test_convert_replaces_a_model_directory_only_with_overwrite(checkpoint, tiny_components, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    convert(checkpoint, out, tiny_components)
    clip_dir, gpt2_dir = tiny_components
    argv = ["convert-clipcap", str(checkpoint), str(out), "--vision-encoder", str(clip_dir), "--decoder", str(gpt2_dir)]
    assert main(argv) == 2
    assert "already holds a prefixcap model directory; pass --overwrite" in capsys.readouterr().err
    (out / "config.json").touch()  # still a model directory; the rewrite must restore it
    assert main(argv + ["--overwrite"]) == 0
    assert CaptionModel.from_pretrained(out).config.stop_token == "."


def test_convert_refuses_a_checkpoint_inside_the_output_even_with_overwrite(checkpoint, tiny_components, tmp_path):
    out = tmp_path / "out"
    convert(checkpoint, out, tiny_components)
    inside = out / "ckpt.pt"
    shutil.copy(checkpoint, inside)
    with pytest.raises(UserError, match="lies inside") as error:
        convert(inside, out, tiny_components, overwrite=True)
    assert str(inside) in one_line(error)
    assert inside.is_file() and (out / "mapper.safetensors").is_file()


def test_save_pretrained_never_deletes_a_folder_that_is_not_a_model_directory(tiny_model_dir, tmp_path):
    model = CaptionModel.from_pretrained(tiny_model_dir)
    folder = foreign_folder(tmp_path / "work")
    with pytest.raises(UserError, match="is not a prefixcap model directory"):
        model.save_pretrained(folder)
    assert_untouched(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no staging folder left behind
    model.save_pretrained(tmp_path / "best")
    model.save_pretrained(tmp_path / "best")  # a model directory is replaced, as training checkpoints need
    assert CaptionModel.from_pretrained(tmp_path / "best").config == model.config


# ---------------------------------------------------------------------- readable by other users
@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def assert_shared(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"


def test_saved_and_converted_models_get_the_umask_permissions(
    umask_022, tiny_model_dir, checkpoint, tiny_components, tmp_path
):
    CaptionModel.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "saved")
    assert_shared(tmp_path / "saved")
    convert(checkpoint, tmp_path / "converted", tiny_components)
    assert_shared(tmp_path / "converted")


# ---------------------------------------------------------------------- damaged files and wrong types
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        lambda path: path.write_bytes(b""),
        lambda path: path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}"),
    ],
    ids=["truncated", "empty", "bad-header"],
)
@pytest.mark.parametrize("file", WEIGHT_FILES)
def test_damaged_weights_are_one_line_naming_the_file(tiny_model_dir, tmp_path, file, damage):
    model_dir = broken_copy(tiny_model_dir, tmp_path)
    damage(model_dir / file)
    with pytest.raises(ModelLoadError) as error:
        CaptionModel.from_pretrained(model_dir)
    assert str(named(model_dir, file)) in one_line(error)


def assert_config_refused(tiny_model_dir, tmp_path, changes: dict, reason: str) -> None:
    """A copy of the tiny model with `changes` in its config.json fails to load with one line
    naming config.json and matching `reason`."""
    model_dir = broken_copy(tiny_model_dir, tmp_path)
    edit_json(model_dir / "config.json", **changes)
    with pytest.raises(ModelLoadError, match=reason) as error:
        CaptionModel.from_pretrained(model_dir)
    assert one_line(error).startswith(f"{model_dir / 'config.json'}: ")


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"prefix_length": "10"}, "prefix_length must be an integer, got '10'"),
        ({"prefix_length": 10.0}, "prefix_length must be an integer, got 10.0"),
        ({"prefix_length": True}, "prefix_length must be an integer"),
        ({"prefix_length": 10**6}, r"prefix_length must be in \[1, "),
        ({"embed_dim": 0}, r"embed_dim must be in \[1, "),
        ({"freeze_decoder": "no"}, "freeze_decoder must be true or false, got 'no'"),
        ({"stop_token": 46}, "stop_token must be a string or null"),
        ({"generation": [30]}, "generation must be an object"),
        ({"generation": {"max_new_tokens": "30"}}, "generation.max_new_tokens must be an integer"),
        ({"generation": {"do_sample": "no"}}, "generation.do_sample must be true or false"),
        ({"generation": {"num_beams": 0}}, "num_beams must be >= 1"),
        ({"generation": {"beams": 2}}, "unknown generation option"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_are_refused(tiny_model_dir, tmp_path, changes, reason):
    assert_config_refused(tiny_model_dir, tmp_path, changes, reason)


@pytest.mark.parametrize(
    "content", [b"\xff\xfe{}", b"[1, 2]", b"{", b"[" * 100_000], ids=["not-utf8", "array", "bad-json", "deep"]
)
def test_config_files_that_are_not_a_json_object_are_refused(tiny_model_dir, tmp_path, content):
    model_dir = broken_copy(tiny_model_dir, tmp_path)
    (model_dir / "config.json").write_bytes(content)
    with pytest.raises(ModelLoadError) as error:
        CaptionModel.from_pretrained(model_dir)
    assert one_line(error).startswith(f"{model_dir / 'config.json'}: ")


def test_a_damaged_component_config_is_one_line(tiny_model_dir, tmp_path):
    model_dir = broken_copy(tiny_model_dir, tmp_path)
    (model_dir / "image_processor" / "preprocessor_config.json").write_text("[1]")
    with pytest.raises(ModelLoadError) as error:
        CaptionModel.from_pretrained(model_dir)
    assert str(model_dir / "image_processor") in one_line(error)


def test_sizes_that_would_allocate_absurd_memory_are_refused_before_allocation():
    # Terabytes, so that code without the check fails at once instead of filling memory.
    config = CaptionConfig(mapper="linear", prefix_length=1024, embed_dim=16384, decoder_hidden_size=16384)
    with pytest.raises(ModelLoadError, match="would have [0-9,]+ parameters"):
        PrefixMapper(config)
    with pytest.raises(ModelLoadError, match="mapper_num_heads"):
        CaptionConfig(mapper="transformer", decoder_hidden_size=32, mapper_num_heads=5)


# ---------------------------------------------------------------------- non-finite weights
def _poison(path: Path, value: float = float("nan")) -> str:
    """Put `value` into the first floating tensor of a safetensors file; returns its name."""
    tensors = load_file(path)
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name].view(-1)[0] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("file", WEIGHT_FILES)
def test_models_with_non_finite_weights_are_refused(tiny_model_dir, tmp_path, file):
    model_dir = broken_copy(tiny_model_dir, tmp_path)
    name = _poison(model_dir / file, float("inf") if file.startswith("decoder") else float("nan"))
    with pytest.raises(ModelLoadError, match="non-finite") as error:
        CaptionModel.from_pretrained(model_dir)
    message = one_line(error)
    assert name in message and str(named(model_dir, file)) in message


def test_checkpoints_with_nan_weights_are_not_converted(checkpoint, tiny_components, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["gpt.transformer.h.1.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ModelLoadError, match="gpt.transformer.h.1.mlp.c_fc.weight has non-finite values") as error:
        convert(tmp_path / "nan.pt", tmp_path / "out", tiny_components)
    assert str(tmp_path / "nan.pt") in one_line(error)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- shape mismatches name the tensor
def test_a_decoder_that_does_not_match_its_config_names_the_tensor(tiny_model_dir, tmp_path):
    model_dir = broken_copy(tiny_model_dir, tmp_path)
    edit_json(model_dir / "decoder" / "config.json", n_inner=48)  # the weights have 4 * 32 = 128
    with pytest.raises(ModelLoadError) as error:
        CaptionModel.from_pretrained(model_dir)
    message = one_line(error)
    assert str(model_dir / "decoder") in message and "mlp.c_fc" in message
    assert "128" in message and "48" in message


def test_a_mapper_that_does_not_match_config_json_names_the_tensor(tiny_model_dir, tmp_path):
    model_dir = broken_copy(tiny_model_dir, tmp_path)
    tensors = load_file(model_dir / "mapper.safetensors")
    tensors["mapper.model.2.bias"] = torch.zeros(7)
    save_file(tensors, model_dir / "mapper.safetensors")
    config = CaptionConfig.load(model_dir)
    width = config.prefix_length * config.decoder_hidden_size
    expected = rf"tensor mapper.model.2.bias has shape \(7,\), but the model needs \({width},\)"
    with pytest.raises(ModelLoadError, match=expected):
        CaptionModel.from_pretrained(model_dir)


def test_a_checkpoint_that_does_not_fit_the_decoder_names_the_tensor(checkpoint, tiny_components, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    key = "gpt.transformer.h.0.mlp.c_proj.weight"
    rows, columns = state[key].shape
    state[key] = torch.zeros(rows + 1, columns)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ModelLoadError) as error:
        convert(tmp_path / "odd.pt", tmp_path / "out", tiny_components)
    message = one_line(error)
    assert str(tmp_path / "odd.pt") in message
    assert f"{key} has shape {(rows + 1, columns)}, but the model needs {(rows, columns)}" in message


# ---------------------------------------------------------------------- defaults that cannot work fail at load
@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"stop_token": "a red"}, "stop_token 'a red' is not a single token"),
        ({"generation": {"max_new_tokens": 500}}, r"max_new_tokens must be <= \d+"),
    ],
)
def test_unusable_stop_token_or_generation_defaults_fail_at_load(tiny_model_dir, tmp_path, changes, reason):
    assert_config_refused(tiny_model_dir, tmp_path, changes, reason)
