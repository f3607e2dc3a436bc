"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, TypeVar

from prefixcap.errors import UserError
from prefixcap.pretrained import DEFAULT_MODEL, REGISTRY

Number = TypeVar("Number", int, float)


def add_model_arguments(
    parser: argparse.ArgumentParser, *, default_model: str | None = DEFAULT_MODEL, batch_size: bool = True
) -> None:
    parser.add_argument(
        "--model",
        default=default_model,
        required=default_model is None,
        help=f"registered name ({', '.join(REGISTRY)}), model directory or hub repo id"
        + (f" (default: {default_model})" if default_model else ""),
    )
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model precision (default: bfloat16 on CUDA, float32 on CPU)",
    )
    if batch_size:
        parser.add_argument(
            "--batch-size", type=bounded(int, 1), default=32, help="images per model batch (default: 32)"
        )


def add_jpeg_draft_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="decode JPEGs at 1/2, 1/4 or 1/8 scale where the model's input size allows (PIL's draft "
        "mode): 2x faster for 640x480 photos, up to 10x for 12 MP ones; the pixels differ slightly "
        "from the reference preprocessing, so captions may too",
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    # Finite numbers only here: the ranges are checked in one place, GenerationOptions.validate.
    group = parser.add_argument_group("decoding (unset options use the model's defaults)")
    group.add_argument("--num-beams", type=bounded(int), help="beam search with this many beams (1 = greedy)")
    group.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy/beam search")
    group.add_argument("--temperature", type=bounded(float), help="sampling temperature")
    group.add_argument("--top-k", type=bounded(int), help="sampling: keep only the k most likely tokens")
    group.add_argument("--top-p", type=bounded(float), help="sampling: nucleus probability mass")
    group.add_argument("--num-captions", type=bounded(int), help="captions per image (beam search or sampling)")
    group.add_argument("--max-new-tokens", type=bounded(int), help="maximum caption length in tokens")
    group.add_argument("--min-new-tokens", type=bounded(int), help="minimum caption length in tokens")
    group.add_argument("--length-penalty", type=bounded(float), help="beam search length penalty exponent")
    group.add_argument("--repetition-penalty", type=bounded(float), help="> 1 discourages repeated tokens")
    group.add_argument("--no-repeat-ngram-size", type=bounded(int), help="forbid repeating n-grams of this size")
    group.add_argument("--seed", type=bounded(int), help="random seed for sampling")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding options the user set, with HF `generate` names."""
    names = {
        "num_beams": "num_beams", "do_sample": "do_sample", "temperature": "temperature", "top_k": "top_k",
        "top_p": "top_p", "num_captions": "num_return_sequences", "max_new_tokens": "max_new_tokens",
        "min_new_tokens": "min_new_tokens", "length_penalty": "length_penalty",
        "repetition_penalty": "repetition_penalty", "no_repeat_ngram_size": "no_repeat_ngram_size", "seed": "seed",
    }  # fmt: skip
    kwargs = {hf: getattr(args, arg) for arg, hf in names.items() if getattr(args, arg) is not None}
    wanted = kwargs.get("num_return_sequences", 1)
    if wanted > 1 and not kwargs.get("do_sample"):  # several captions need beams or sampling
        kwargs["num_beams"] = max(kwargs.get("num_beams", 1), wanted)
    return kwargs


def check_generation(model, kwargs: dict[str, Any]) -> None:
    """Reject bad decoding options before any work starts, with the model's defaults applied."""
    try:
        model.generation_options(**kwargs)
    except ValueError as error:
        raise UserError(str(error)) from None


def load_captioner(args: argparse.Namespace, **kwargs: Any):
    from prefixcap.captioner import Captioner

    return Captioner.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, **kwargs
    )


def bounded(
    kind: Callable[[str], Number], minimum: Number | None = None, maximum: Number | None = None
) -> Callable[[str], Number]:
    """An argparse type (`int` or `float`) in [minimum, maximum], so that a bad value fails before
    any work starts. Every numeric option of every command uses it: NaN and infinities are refused
    (`inf` would pass a lower bound, and NaN passes no comparison at all)."""

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            span = f"at most {maximum}" if minimum is None else f"at least {minimum}"
            span = span if None in (minimum, maximum) else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse
