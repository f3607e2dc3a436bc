"""The `prefixcap` command. Each module in this package that defines `register(subparsers)`
adds one subcommand, so new commands need no edit here."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from prefixcap.errors import UserError
from prefixcap.system.hardware import parse_device
from prefixcap.system.terminal import for_terminal


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixcap",
        description="Caption images with CLIP prefixes and GPT-2: caption, train, evaluate and serve.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if getattr(args, "device", None) is not None:  # every command with --device, before any work
            args.device = str(parse_device(args.device))
        return args.func(args)
    except UserError as error:
        print(for_terminal(f"error: {error}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Load reports and weight-loading bars from transformers are noise on a command line."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
