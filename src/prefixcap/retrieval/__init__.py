"""Retrieval-augmented captioning's datastore: captions embedded with a CLIP's text tower, found
by image embeddings, and the prompt that puts them before a caption (SmallCap, CVPR 2023).
Needs the `retrieval` extra (faiss-cpu).

The public names load lazily (as `prefixcap`'s do), so that `prefixcap --help` does not import
the CLIP classes."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CaptionEncoder": "prefixcap.retrieval.encoder",
    "DEFAULT_TEMPLATE": "prefixcap.retrieval.prompt",
    "Datastore": "prefixcap.retrieval.store",
    "EncoderRecord": "prefixcap.retrieval.encoder",
    "INDEX_KINDS": "prefixcap.retrieval.index",
    "IndexSettings": "prefixcap.retrieval.index",
    "Retrieved": "prefixcap.retrieval.store",
    "add_to_datastore": "prefixcap.retrieval.store",
    "build_datastore": "prefixcap.retrieval.store",
    "check_template": "prefixcap.retrieval.prompt",
    "retrieval_prompt": "prefixcap.retrieval.prompt",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prefixcap.retrieval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
