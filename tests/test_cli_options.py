"""Every numeric option of every command is range-checked by one shared type, and decoding options
refuse values that would silently produce empty captions."""

from __future__ import annotations

import argparse

import pytest

from prefixcap.cli import build_parser
from prefixcap.cli.common import bounded
from prefixcap.options import MIN_TEMPERATURE, GenerationOptions


def _numeric_options() -> list[tuple[str, argparse.Action]]:
    """(command, option) for every option of every subcommand that parses a number."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [
        (command, action)
        for command, parser in subparsers.choices.items()
        for action in parser._actions
        if action.option_strings and (action.type in (int, float) or _is_bounded(action.type))
    ]


def _is_bounded(kind: object) -> bool:
    return getattr(kind, "__qualname__", "").startswith(f"{bounded.__name__}.")


def test_every_numeric_option_uses_the_bounded_type() -> None:
    options = _numeric_options()
    assert len(options) > 20  # the walk really finds the commands' options
    plain = [f"{command} {action.option_strings[0]}" for command, action in options if not _is_bounded(action.type)]
    assert plain == []


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e999"])
def test_no_numeric_option_accepts_non_finite_values(text: str) -> None:
    for _, action in _numeric_options():
        with pytest.raises(argparse.ArgumentTypeError):
            action.type(text)


def test_bounded_names_the_range() -> None:
    port = bounded(int, 0, 65535)
    assert port("8080") == 8080
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 65535\], got 70000"):
        port("70000")
    with pytest.raises(argparse.ArgumentTypeError, match="is not an integer"):
        port("80.5")


def test_serve_refuses_out_of_range_port_and_limits(capsys: pytest.CaptureFixture) -> None:
    for option, value in [("--port", "70000"), ("--max-upload-mb", "nan"), ("--max-upload-mb", "inf")]:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["serve", option, value])
        assert exit_info.value.code == 2
        assert option in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [1e-45, MIN_TEMPERATURE / 2, 0.0, float("inf"), float("nan")])
def test_temperatures_that_break_sampling_are_refused(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        GenerationOptions.from_kwargs({"do_sample": True, "temperature": temperature})


@pytest.mark.parametrize("name", ["top_p", "length_penalty", "repetition_penalty"])
def test_non_finite_float_options_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        GenerationOptions.from_kwargs({name: float("inf")})


def test_cli_temperature_below_minimum_is_one_line(tiny_model_dir, example_images, capsys) -> None:
    from prefixcap.cli import main

    code = main(
        ["caption", "--model", str(tiny_model_dir), "--do-sample", "--temperature", "1e-45", str(example_images[0])]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "temperature must be >=" in err
