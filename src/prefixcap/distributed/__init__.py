"""Captioning at scale: inputs cut into parts, split over the processes of an `accelerate launch`
(or torchrun) job, streamed through DataLoader workers, written as part files and merged.

Names load lazily (as in `prefixcap`), so that the CLI can use `FORMATS` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FORMATS": "prefixcap.distributed.outputs",
    "RecordWriter": "prefixcap.distributed.outputs",
    "Result": "prefixcap.distributed.outputs",
    "Part": "prefixcap.distributed.plan",
    "is_shard": "prefixcap.distributed.plan",
    "plan_parts": "prefixcap.distributed.plan",
    "PartImages": "prefixcap.distributed.loading",
    "caption_parts": "prefixcap.distributed.loading",
    "in_input_order": "prefixcap.distributed.loading",
    "read_shard": "prefixcap.distributed.loading",
    "Summary": "prefixcap.distributed.job",
    "caption_to_directory": "prefixcap.distributed.job",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prefixcap.distributed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
