"""Loading Hugging Face checkpoints with one-line errors: the image encoders' and the decoder's
loaders share these, so that a missing file, a damaged tensor or a wrong shape reads the same
whichever component it is in."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from prefixcap.errors import ModelLoadError
from prefixcap.system.hub import missing_from_hub
from prefixcap.system.quiet import quiet_transformers


def hf_call(loader: Any, source: str | Path, what: str, **kwargs: Any) -> Any:
    """Run a transformers loader; turn its errors into one clear line. Missing files and bad ids
    raise OSError or ValueError, damaged files anything from SafetensorError to AttributeError."""
    if reason := missing_from_hub(source):  # an unreachable hub: at once, not after minutes of retries
        raise ModelLoadError(f"{source}: cannot load the {what} ({reason})")
    try:
        with quiet_transformers():
            return loader(str(source), **kwargs)
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
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelLoadError(f"{source}: tensor {prefix}{name} has non-finite values (NaN or inf)")


def first_names(names: Iterable[str]) -> str:
    """The first of some tensor names, and how many more there are."""
    names = sorted(names)
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
