"""Help texts carry no speed figures: they go stale with every change to the code or the hardware, so
the README's "Speed" section quotes them, next to the benchmark results they come from."""

from __future__ import annotations

import argparse
import re

import pytest

from prefixcap.cli import build_parser

# "2x", "10×", "2.3 ×" followed by a non-word character or the end; not a size such as "640x480".
SPEED_FIGURE = re.compile(r"\d+(\.\d+)?\s?[x×](?!\w)")


def _commands() -> dict[str, argparse.ArgumentParser]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


@pytest.mark.parametrize("text", ["2x faster", "up to 10× for", "2.3 ×.", "(3x)", "is 4x"])
def test_the_pattern_finds_speed_figures(text: str) -> None:
    assert SPEED_FIGURE.search(text)


@pytest.mark.parametrize("text", ["640x480 photos", "a 1920×1080 one", "0x1f", "max"])
def test_the_pattern_leaves_sizes_and_words_alone(text: str) -> None:
    assert not SPEED_FIGURE.search(text)


def test_no_help_text_quotes_a_speed_figure() -> None:
    commands = _commands()
    assert {"caption", "serve", "train"} <= set(commands)  # the walk really finds the subcommands
    helps = {"prefixcap": build_parser().format_help(), **{name: p.format_help() for name, p in commands.items()}}
    quoted = {name: match.group() for name, text in helps.items() if (match := SPEED_FIGURE.search(text))}
    assert quoted == {}
