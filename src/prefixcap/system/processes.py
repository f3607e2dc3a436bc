"""Which process of a job this one is. Under `accelerate launch` or torchrun that is accelerate's
`PartialState`; without accelerate (the core install, no [scale] extra) a plain single process,
so that `caption` and `prepare` need accelerate only to split work over several processes."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from prefixcap.system.extras import require
from prefixcap.system.hardware import default_device


@dataclass
class SingleProcess:
    """The part of `accelerate.PartialState` that `caption` and `prepare` use, for one process."""

    device: torch.device = field(default_factory=default_device)
    num_processes: int = 1
    process_index: int = 0
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""


def process_state() -> Any:
    """accelerate's PartialState when accelerate is installed, else a SingleProcess; a job launched
    as several processes (WORLD_SIZE > 1) needs accelerate."""
    if importlib.util.find_spec("accelerate") is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            require("scale", "accelerate", feature="a job of several processes")
        return SingleProcess()
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def broadcast(values: list[Any], state: Any) -> None:
    """Replace `values` in place by the main process's, in every process of the job."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(values)
