"""Training state without pickles: tensors go to safetensors, everything else to JSON.

`RUN_DIR/last/training_state/` holds the optimizer, LR scheduler and gradient scaler state dicts,
every process's RNG states, the progress counters and the resolved options. Any nested state dict
is stored by `to_storable`: each tensor is replaced by a reference to a safetensors entry, and dicts
with non-string keys (an optimizer's per-parameter state) keep their keys as [key, value] pairs.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prefixcap.errors import UserError
from prefixcap.system.atomic import atomic_path, write_atomic

STATE_DIR = "training_state"
TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
_TENSOR = "__tensor__"  # {"__tensor__": key}: the safetensors entry `key`
_ITEMS = "__items__"  # {"__items__": [[key, value], ...]}: a dict whose keys are not all strings


@dataclass
class Progress:
    """Where a run stands; stored in the training state so that `--resume` continues from it."""

    epoch: int = 0  # epochs finished
    epoch_step: int = 0  # optimizer steps finished in the current epoch
    step: int = 0  # optimizer steps finished in all
    loss_sum: float = 0.0  # running train loss of the current epoch ...
    loss_steps: int = 0  # ... over this many steps
    best: float | None = None  # best validation score so far
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished epoch
    sums: dict[str, float] = field(default_factory=dict)  # other running sums of the epoch (SCST: reward, ...)


@dataclass
class TrainingState:
    optimizer: dict[str, Any]  # optimizer.state_dict()
    scheduler: dict[str, Any]  # LR scheduler state_dict()
    scaler: dict[str, Any] | None  # fp16 gradient scaler state_dict(), if any
    rng: list[dict[str, Any]]  # capture_rng() of each process, by rank
    progress: Progress
    config: dict[str, Any]  # the resolved TrainConfig
    store: str | None = None  # FeatureStore.identity of the features trained on (None: an older run)


def save_training_state(directory: Path, state: TrainingState) -> None:
    """Write both files atomically: a crash leaves the previous state or the new one."""
    tensors: dict[str, torch.Tensor] = {}
    progress = asdict(state.progress)
    if not progress["sums"]:  # only SCST runs keep other sums: other runs' states keep their layout
        del progress["sums"]
    document = to_storable({**state.__dict__, "progress": progress}, tensors, "")
    with atomic_path(directory / TENSORS_FILE) as staging:
        save_file(tensors, staging)
    write_atomic(directory / JSON_FILE, json.dumps(document) + "\n")


def load_training_state(directory: Path) -> TrainingState:
    """The state saved in `directory`; a missing or damaged file is a one-line UserError."""
    document_path, tensors_path = directory / JSON_FILE, directory / TENSORS_FILE
    if not document_path.is_file():
        raise UserError(f"{directory}: missing, so there is no checkpoint to resume from")
    try:
        document = json.loads(document_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(document_path, error) from None
    try:
        tensors = load_file(tensors_path)
    except (OSError, SafetensorError) as error:
        raise damaged(tensors_path, error) from None
    try:
        state = TrainingState(**from_storable(document, tensors))
    except (KeyError, TypeError, ValueError) as error:  # a field, or a tensor it refers to, is missing
        raise damaged(document_path, error) from None
    kinds = {"optimizer": dict, "scheduler": dict, "rng": list, "progress": dict, "config": dict}
    wrong = [name for name, kind in kinds.items() if not isinstance(getattr(state, name), kind)]
    if wrong:
        raise damaged(document_path, f"{wrong[0]} is not a {kinds[wrong[0]].__name__}")
    state.progress = _load_progress(state.progress, document_path)
    return state


def _load_progress(saved: dict[str, Any], document_path: Path) -> Progress:
    """The stored progress dict as `Progress`: every counter must be there (none has a safe default
    when resuming), and an unknown one means the file is not what this version wrote."""
    names = {item.name for item in fields(Progress)}
    optional = {"sums"}  # added later: absent from earlier runs' states
    missing, unknown = sorted(names - optional - saved.keys()), sorted(saved.keys() - names)
    if missing:
        raise damaged(document_path, f"its progress lacks {', '.join(missing)}")
    if unknown:
        raise damaged(document_path, f"its progress has unknown fields {', '.join(unknown)}")
    return Progress(**saved)


def damaged(path: Path, reason: str | Exception) -> UserError:
    """The one-line error for a training state file that cannot be used."""
    text = f"{type(reason).__name__}: {reason}" if isinstance(reason, Exception) else reason
    return UserError(
        f"{path}: damaged training state ({' '.join(text.split())}); resume from an intact copy or start a new run"
    )


def to_storable(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """`value` as JSON-able data; its tensors are moved into `tensors` under dotted keys."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu", copy=True)  # a copy: safetensors refuses shared storage
        return {_TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(name, str) for name in value):
            return {name: to_storable(item, tensors, f"{key}.{name}") for name, item in value.items()}
        return {_ITEMS: [[name, to_storable(item, tensors, f"{key}.{name}")] for name, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return [to_storable(item, tensors, f"{key}.{i}") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in the training state (at {key!r})")


def from_storable(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `to_storable` (tuples come back as lists, which state dicts accept)."""
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _ITEMS in value:
            return {name: from_storable(item, tensors) for name, item in value[_ITEMS]}
        return {name: from_storable(item, tensors) for name, item in value.items()}
    if isinstance(value, list):
        return [from_storable(item, tensors) for item in value]
    return value


def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA random states."""
    numpy_name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_name, keys.tolist(), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((numpy_name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
