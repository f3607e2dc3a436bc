"""LoRA adapters on the decoder, through PEFT (the `lora` extra).

Training injects LoRA layers into the Hugging Face decoder in place (`peft.inject_adapter_in_model`),
so the decoder keeps its class and its module names: the training loss, `freeze_first_blocks` and
the decoding engine (which calls a wrapped projection as a module, base weight plus adapter) all
work on it unchanged. A model directory stores only the adapter, in PEFT's own format, next to a
reference to the base decoder (`CaptionConfig.decoder`):

    decoder_adapter/adapter_config.json          peft.LoraConfig
    decoder_adapter/adapter_model.safetensors    the LoRA weights (keys as PeftModel saves them)

so `peft.PeftModel.from_pretrained(base, "decoder_adapter")` reads it too. Loading for inference
merges the adapter into the base weights (`merge_and_unload`): the decoder is a plain HF model
again, and runs at full speed. Loading to continue training keeps the adapter separate.

PEFT is imported only after `prefixcap.system.extras.require("lora", ...)`.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from prefixcap.engine.families import FAMILIES, family_of
from prefixcap.errors import ModelLoadError, UserError
from prefixcap.model.hf_loading import first_non_finite, read_json
from prefixcap.system.extras import require

ADAPTER_DIR = "decoder_adapter"  # in a model directory
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the tensors of its wrapped model
_NAME = "default"  # PEFT's adapter name; prefixcap uses one adapter per decoder
MAX_ALPHA = 65536  # LoRA's alpha (its scale is alpha / r); training's default is 2 r, and r <= 4096
# The fields of adapter_config.json that prefixcap sets; loading reads these, and every other field
# of PEFT's LoraConfig must keep its default (modules_to_save, use_dora, rank_pattern, megatron_core,
# ... would change what loads, or import a module by name). inference_mode is set on loading.
_WRITTEN = ("r", "lora_alpha", "target_modules", "fan_in_fan_out", "task_type", "base_model_name_or_path")
_INFORMATIVE = ("inference_mode", "peft_version")


def require_peft(feature: str) -> None:
    """One line naming `pip install "prefixcap[lora]"` when PEFT is missing."""
    require("lora", "peft", feature=feature)


def has_adapter(decoder: nn.Module) -> bool:
    """Whether `decoder` carries injected (unmerged) PEFT adapter layers."""
    return bool(getattr(decoder, "peft_config", None))


def default_targets(decoder: PreTrainedModel) -> tuple[str, ...]:
    """The module names LoRA adapts by default in `decoder`'s family: every linear layer of its
    blocks (`prefixcap.engine.families`)."""
    family = family_of(decoder, exact=False)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        model_type = getattr(decoder.config, "model_type", None)
        raise UserError(
            f"--freeze lora: no default LoRA targets for a {model_type!r} decoder (known: {known}); "
            "give --lora-targets, the comma-separated names of its linear layers (e.g. q_proj,v_proj)"
        )
    return family.lora_targets


def add_lora(decoder: PreTrainedModel, rank: int, alpha: float, targets: Sequence[str] | None = None) -> None:
    """Inject fresh LoRA layers (A random, B zero: the decoder's function is unchanged at first)
    into the modules of `decoder` named `targets` (None: the family's `default_targets`), and
    freeze everything of it but them."""
    require_peft("--freeze lora")
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    problem = size_problem(rank, alpha, decoder, names=("--lora-rank", "--lora-alpha"))
    if problem:
        raise UserError(problem)
    targets = tuple(targets) if targets else default_targets(decoder)
    matched = {name.rpartition(".")[2]: module for name, module in decoder.named_modules()}
    unknown = [target for target in targets if target not in matched]
    if unknown:
        raise UserError(
            f"--lora-targets: the {type(decoder).__name__} has no module named {', '.join(unknown)}; "
            f"its leaf modules include {', '.join(sorted(_leaf_names(decoder))[:12])}"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        # GPT-2's Conv1D stores weights [in, out], the transpose of nn.Linear's
        fan_in_fan_out=any(isinstance(matched[target], Conv1D) for target in targets),
        task_type="CAUSAL_LM",
    )
    try:
        inject_adapter_in_model(config, decoder, adapter_name=_NAME)
    except ValueError as error:  # e.g. a target that is not a layer type LoRA supports
        raise UserError(f"--lora-targets {','.join(targets)}: {str(error).splitlines()[0]}") from None


def save_adapter(decoder: nn.Module, directory: Path, base: str) -> None:
    """Write `decoder`'s adapter to `directory` in PEFT's format, with `base` (the base decoder's
    hub id or folder) as its `base_model_name_or_path`."""
    from peft import get_peft_model_state_dict

    config = decoder.peft_config[_NAME]
    config.base_model_name_or_path = base
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    state = get_peft_model_state_dict(decoder, adapter_name=_NAME)
    save_file({_PEFT_PREFIX + name: tensor.contiguous() for name, tensor in state.items()}, directory / ADAPTER_WEIGHTS)


def load_adapter(
    decoder: PreTrainedModel, directory: Path, weights: Mapping[str, torch.Tensor], *, merge: bool
) -> PreTrainedModel:
    """`decoder` with the adapter of `directory` (its config; `weights`, the tensors read from its
    safetensors file) applied: merged into the base weights (a plain HF model), or kept as separate
    trainable layers (`merge=False`, to continue training it)."""
    require_peft(f"{directory.parent}: a LoRA model directory")
    from peft import LoraModel, set_peft_model_state_dict

    config = read_adapter_config(directory / ADAPTER_CONFIG, decoder)
    config.inference_mode = merge  # False: the injected layers train
    source = directory / ADAPTER_WEIGHTS
    try:
        tuner = LoraModel(decoder, config, _NAME)  # injects the layers into `decoder`, in place
        state = {name.removeprefix(_PEFT_PREFIX): tensor for name, tensor in weights.items()}
        result = set_peft_model_state_dict(decoder, state, adapter_name=_NAME)
    except (ValueError, RuntimeError) as error:  # targets the decoder lacks, tensors of the wrong shape
        raise ModelLoadError(f"{source}: does not fit the decoder ({str(error).strip().splitlines()[0]})") from None
    missing = [name for name in result.missing_keys if f".{_NAME}." in name and "lora_" in name]
    if result.unexpected_keys or missing:
        what = f"unexpected tensor {result.unexpected_keys[0]}" if result.unexpected_keys else f"lacks {missing[0]}"
        raise ModelLoadError(f"{source}: {what} (an adapter for another decoder?)")
    if not merge:
        return decoder
    merged = tuner.merge_and_unload()
    overflow = first_non_finite(merged.state_dict())  # B A x alpha / r can overflow float32, and NaN captions are empty
    if overflow is not None:
        raise ModelLoadError(f"{directory}: merging the adapter gives non-finite weights ({overflow})")
    return merged


def read_adapter_config(path: Path, decoder: PreTrainedModel) -> Any:
    """The peft.LoraConfig of an adapter_config.json that prefixcap wrote for `decoder`, checked:
    only the `_WRITTEN` fields may differ from LoraConfig's defaults, and r and lora_alpha must be
    in range (`size_problem`), so that nothing is allocated for a config PEFT would misread."""
    from peft import LoraConfig

    values = read_json(path)
    if not isinstance(values, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    defaults = json.loads(json.dumps(LoraConfig().to_dict()))  # as save_pretrained writes them
    for key, value in values.items():
        if key in _WRITTEN or key in _INFORMATIVE:
            continue
        if key in defaults:
            if value == defaults[key]:
                continue
            reason = f"prefixcap's adapters leave it {json.dumps(defaults[key])}"
        elif value in (None, False, [], {}):  # a newer PEFT's field, unset
            continue
        else:
            reason = "not a LoRA field prefixcap writes"
        raise ModelLoadError(f"{path}: {key} is set ({reprlib.repr(value)}); {reason}")
    rank, alpha = values.get("r", defaults["r"]), values.get("lora_alpha", defaults["lora_alpha"])
    targets, fan_in_fan_out = values.get("target_modules"), values.get("fan_in_fan_out", False)
    task, base = values.get("task_type"), values.get("base_model_name_or_path")
    problem = size_problem(rank, alpha, decoder)
    if problem is None and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t.isidentifier() for t in targets)
    ):
        problem = f"target_modules must be a list of module names, got {reprlib.repr(targets)}"
    if problem is None and not isinstance(fan_in_fan_out, bool):
        problem = f"fan_in_fan_out must be true or false, got {reprlib.repr(fan_in_fan_out)}"
    if problem is None and task not in (None, "CAUSAL_LM"):
        problem = f"task_type is set ({reprlib.repr(task)}); prefixcap's adapters are CAUSAL_LM"
    if problem is None and not isinstance(base, str | None):
        problem = f"base_model_name_or_path must be a string, got {reprlib.repr(base)}"
    if problem:
        raise ModelLoadError(f"{path}: {problem}")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), fan_in_fan_out=fan_in_fan_out,
                      task_type=task, base_model_name_or_path=base)  # fmt: skip


def size_problem(rank: Any, alpha: Any, decoder: nn.Module, names: tuple[str, str] = ("r", "lora_alpha")) -> str | None:
    """Why `rank` and `alpha` (named `names`) cannot be those of an adapter on `decoder`, or None:
    r is an integer up to the decoder's width (more adds nothing, and allocates r x width per
    adapted layer), alpha a number in (0, MAX_ALPHA] (NaN or a huge scale empties every caption)."""
    width = decoder.get_input_embeddings().embedding_dim
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= width:
        return f"{names[0]} must be an integer between 1 and {width} (the decoder's width), got {reprlib.repr(rank)}"
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= MAX_ALPHA:
        return f"{names[1]} must be a number > 0 and at most {MAX_ALPHA}, got {reprlib.repr(alpha)}"
    return None


def _leaf_names(module: nn.Module) -> set[str]:
    return {name.rpartition(".")[2] for name, child in module.named_modules() if name and not list(child.children())}
