"""prefixcap: image captioning with CLIP prefixes and GPT-2 (the ClipCap design).

The public names load lazily, so `import prefixcap.data` or `prefixcap --help` do not pay for
importing torch and transformers up front.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CaptionConfig": "prefixcap.model.config",
    "CaptionModel": "prefixcap.model.caption_model",
    "Captioner": "prefixcap.captioner",
    "GenerationOptions": "prefixcap.options",
    "ImageLoadError": "prefixcap.errors",
    "ModelLoadError": "prefixcap.errors",
    "TextOptions": "prefixcap.options",
    "UserError": "prefixcap.errors",
    "load_image": "prefixcap.inputs.images",
    "load_model": "prefixcap.model.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prefixcap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
