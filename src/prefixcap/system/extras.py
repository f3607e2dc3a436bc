"""Optional dependencies. The core install captions images from Python and the shell; training,
evaluation, serving and scaling out each come with an extra (`pip install "prefixcap[serve]"`).

A feature that needs an extra calls `require` before its first import of it, so that a missing
package is one line naming the extra to install, not an ImportError traceback."""

from __future__ import annotations

import importlib.util

from prefixcap.errors import UserError

# extra -> {import name: distribution}, as declared in pyproject.toml's optional-dependencies
EXTRAS: dict[str, dict[str, str]] = {
    "train": {
        "accelerate": "accelerate",
        "yaml": "pyyaml",
        "tensorboard": "tensorboard",
        "matplotlib": "matplotlib",
        "pycocoevalcap": "pycocoevalcap",
    },
    "eval": {"pycocoevalcap": "pycocoevalcap", "bert_score": "bert-score", "matplotlib": "matplotlib"},
    "serve": {
        "fastapi": "fastapi",
        "uvicorn": "uvicorn",
        "multipart": "python-multipart",
        "prometheus_client": "prometheus-client",
        "swagger_ui_bundle": "swagger-ui-bundle",
    },
    "scale": {"accelerate": "accelerate", "webdataset": "webdataset", "pyarrow": "pyarrow"},
    "datasets": {"datasets": "datasets"},
    "lora": {"peft": "peft"},  # also in pyproject's train extra; only --freeze lora and LoRA models need it
    "onnx": {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"},
    "retrieval": {"faiss": "faiss-cpu"},
    "label": {"httpx": "httpx"},
    "ray": {"ray": "ray[data]", "pandas": "pandas", "pyarrow": "pyarrow"},
}


class MissingExtraError(UserError):
    """An optional dependency is not installed; the message says which pip install adds it."""


def require(extra: str, *modules: str, feature: str) -> None:
    """Raise MissingExtraError unless every import name in `modules` (default: all of `extra`'s)
    can be imported. Nothing is imported here: `find_spec` only looks."""
    wanted = modules or tuple(EXTRAS[extra])
    missing = [EXTRAS[extra][name] for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f'{feature} needs {", ".join(missing)}: pip install "prefixcap[{extra}]"')
