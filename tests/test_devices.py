"""--device names a device this machine has, or the command stops with one line that lists the ones
it has (`--device cuda` without a GPU, or `--device gpu`, gave a 30-line torch traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from prefixcap.cli import main
from prefixcap.errors import UserError
from prefixcap.system.hardware import available_devices, parse_device
from tests.helpers_pipeline import subprocess_env


def test_parse_device_accepts_what_this_machine_has() -> None:
    assert parse_device(None) == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert parse_device("cpu") == torch.device("cpu")
    assert available_devices()[0] == "cpu"
    for name in available_devices():
        assert parse_device(name) == torch.device(name)


@pytest.mark.parametrize("text", ["gpu", "cuda:99", "cuda:-1", "", "meta"])
def test_parse_device_refuses_others_in_one_line_naming_the_devices_here(text: str) -> None:
    with pytest.raises(UserError) as error:
        parse_device(text)
    message = str(error.value)
    assert "\n" not in message
    assert f"device {text!r}" in message
    assert "this machine has " + ", ".join(available_devices()) in message


def _command(name: str, tiny_model_dir, example_images, tmp_path) -> list[str]:
    """Each command that takes --device, with arguments that would otherwise start real work."""
    model = ["--model", str(tiny_model_dir)]
    data = ["--data", str(example_images[0].parent)]
    return {
        "caption": ["caption", *model, str(example_images[0])],
        "serve": ["serve", *model, "--port", "0"],
        "evaluate": ["evaluate", *model, *data, "--out", str(tmp_path / "evaluation")],
        "score": ["score", "--results", str(tmp_path / "results.json"), "--references", str(example_images[0].parent)],
    }[name]


@pytest.mark.parametrize("command", ["caption", "serve", "evaluate", "score"])
@pytest.mark.parametrize("device", ["gpu", "cuda:99"])
def test_every_command_taking_device_refuses_a_missing_one_in_one_line(
    command, device, tiny_model_dir, example_images, tmp_path, capsys
) -> None:
    assert main([*_command(command, tiny_model_dir, example_images, tmp_path), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: device {device!r}"), err
    assert "this machine has cpu" in err
    assert not (tmp_path / "evaluation").exists()


def test_device_cuda_without_a_gpu_is_one_line_from_the_shell(tiny_model_dir, example_images) -> None:
    """The issue's case as a user meets it: no GPU visible, `--device cuda`."""
    command = [sys.executable, "-m", "prefixcap", "caption", "--model", str(tiny_model_dir), "--device", "cuda"]
    result = subprocess.run(
        [*command, str(example_images[0])], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: device 'cuda' is not available: this machine has cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:99"])
def test_the_python_api_refuses_a_missing_device_as_the_cli_does(device, tiny_model_dir) -> None:
    from prefixcap import Captioner
    from prefixcap.errors import UserError

    with pytest.raises(UserError, match=rf"^device {device!r} .*: this machine has cpu"):
        Captioner.from_pretrained(tiny_model_dir, device=device)
