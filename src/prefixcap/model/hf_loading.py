"""Loading Hugging Face checkpoints with one-line errors: the image encoders' and the decoder's
loaders share these, so that a missing file, a damaged tensor or a wrong shape reads the same
whichever component it is in.

No model's own code ever runs: every loader gets `trust_remote_code=False`, and a folder whose
configs ask for custom code (`auto_map`) is refused before any loader reads it, since transformers
would otherwise ask on stdin whether to run the folder's Python."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from prefixcap.errors import ModelLoadError
from prefixcap.system.files import TooLargeError, read_regular
from prefixcap.system.hub import missing_from_hub
from prefixcap.system.quiet import quiet_transformers

MAX_CONFIG_BYTES = 16 * 2**20  # a config file larger than this is not one


def hf_call(loader: Any, source: str | Path, what: str, **kwargs: Any) -> Any:
    """Run a transformers loader, never trusting remote code; turn its errors into one clear line.
    Missing files and bad ids raise OSError or ValueError, damaged files anything from
    SafetensorError to AttributeError."""
    refuse_remote_code(source)
    if reason := missing_from_hub(source):  # an unreachable hub: at once, not after minutes of retries
        raise ModelLoadError(f"{source}: cannot load the {what} ({reason})")
    try:
        with quiet_transformers():
            return loader(str(source), trust_remote_code=False, **kwargs)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadError(f"{source}: cannot load the {what} ({reason})") from None


def load_checked(loader: Callable[..., Any], source: str | Path, what: str, **kwargs: Any) -> Any:
    """Load safetensors weights with a transformers loader, refusing what it only logs: a tensor
    whose shape differs from the model's config (it would be re-initialised at random), a missing
    tensor, and non-finite values (NaN weights give empty captions)."""
    model, info = hf_call(
        loader, source, what, use_safetensors=True, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
    )
    if info["mismatched_keys"]:
        name, found, expected = min(info["mismatched_keys"], key=lambda entry: entry[0])
        raise ModelLoadError(
            f"{source}: the {what}'s tensor {name} has shape {tuple(found)}, but its config.json gives "
            f"{tuple(expected)}"
        )
    if info["missing_keys"]:
        raise ModelLoadError(f"{source}: the {what}'s weights lack {first_names(info['missing_keys'])}")
    check_finite(model.state_dict(), source)
    return model


def check_finite(state: Mapping[str, torch.Tensor], source: str | Path, *, prefix: str = "") -> None:
    """Refuse NaN or infinite weights: they make every caption empty, silently."""
    name = first_non_finite(state)
    if name is not None:
        raise ModelLoadError(f"{source}: tensor {prefix}{name} has non-finite values (NaN or inf)")


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of `state` holding a NaN or an infinity, or None."""
    return next((n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def first_names(names: Iterable[str]) -> str:
    """The first of some tensor names, and how many more there are."""
    names = sorted(names)
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def refuse_remote_code(source: str | Path) -> None:
    """Refuse a local folder whose config files (`*config.json`) ask for custom code (an `auto_map`
    entry): prefixcap runs no model's code. A hub id is left to `trust_remote_code=False`."""
    folder = Path(source)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*config*.json")):
        try:
            config = read_json(path)
        except ModelLoadError:
            continue  # damaged, or not a regular file: the loader reports it (trust_remote_code=False still holds)
        if isinstance(config, dict) and "auto_map" in config:
            raise ModelLoadError(
                f"{path}: asks to run the folder's own Python code (auto_map); prefixcap never runs a model's code"
            )


def read_json(path: Path) -> Any:
    """The JSON value of the regular file `path` (at most MAX_CONFIG_BYTES: a FIFO or device would
    block or never end); ModelLoadError names the file and the problem."""
    try:
        data = read_regular(path, MAX_CONFIG_BYTES)
    except TooLargeError:
        raise ModelLoadError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a config file") from None
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged one (empty, truncated, bad header) is one line."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{path}: damaged safetensors file ({error})") from None


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, *, prefix: str = "") -> None:
    """`module.load_state_dict(state)`, with one line naming `source` and the tensor (as the file
    names it: `prefix` + key) for a missing or unexpected tensor, a wrong shape or non-finite values."""
    expected = module.state_dict()
    if expected.keys() - state.keys():
        raise ModelLoadError(f"{source}: tensor {prefix}{first_names(expected.keys() - state.keys())} is missing")
    if state.keys() - expected.keys():
        raise ModelLoadError(f"{source}: unexpected tensor {prefix}{first_names(state.keys() - expected.keys())}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelLoadError(
                f"{source}: tensor {prefix}{name} has shape {tuple(tensor.shape)}, but the model needs "
                f"{tuple(expected[name].shape)}"
            )
    check_finite(state, source, prefix=prefix)
    module.load_state_dict(state)
