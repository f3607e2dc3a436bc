"""Teachers: the models that label images, as a table of kinds, and what they take and give.

A teacher is named by a spec `KIND:TARGET`:
- `hf:PATH_OR_ID`: a local Hugging Face image-text-to-text model (SmolVLM, Qwen2-VL, LLaVA, ...);
- `openai:URL#MODEL`: an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, Ollama,
  LM Studio, hosted APIs, `prefixcap serve`). URL is the API's base (`http://host:8000/v1`, as
  the `openai` client's base_url) and MODEL the model to ask for; `#` separates them because it
  is the one character that a URL never sends to a server and model names do not use, while `:`
  and `/` are in both (`llava:13b`, `Qwen/Qwen2-VL-7B-Instruct`). Without `#MODEL`, the
  endpoint's only model (`GET /models`) is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from prefixcap.errors import UserError
from prefixcap.inputs.images import load_image
from prefixcap.inputs.loader import read_image
from prefixcap.inputs.sources import LocalPath

# kind -> (module, class, what the target is); imported only when a teacher of that kind is used
KINDS = {
    "hf": ("prefixcap.labeling.hf", "HFTeacher", "a local Hugging Face VLM: hf:FOLDER_OR_HUB_ID"),
    "openai": (
        "prefixcap.labeling.endpoint",
        "OpenAITeacher",
        "an OpenAI-compatible chat-completions endpoint: openai:URL#MODEL",
    ),
}


@dataclass(frozen=True)
class LabelItem:
    """One image to label and what the teacher is asked about it."""

    image: str  # a file, or an image inside a dataset file: `shard.tar#key.jpg`, `data.parquet#row=N`
    instruction: str  # the rendered prompt
    is_file: bool = True
    data: bytes | None = None  # the encoded image, when it was read already (a shard's member)

    def load(self) -> Image.Image:
        """The image, upright RGB, read as every prefixcap input is; raises ImageLoadError."""
        if self.data is not None:
            return load_image(self.data, name=self.image)
        return read_image(LocalPath(self.image) if self.is_file else self.image)


@dataclass(frozen=True)
class Failure:
    """Why an image got no label; it is listed and the run goes on."""

    reason: str
    attempts: int = 1


Outcome = str | Failure  # a caption, or why there is none


@dataclass
class TeacherOptions:
    """Everything `label` may set for a teacher; each kind reads its own (None: its default)."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    # local models
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 8
    trust_remote_code: bool = False
    # endpoints
    concurrency: int = 4
    rate_limit: float | None = None  # requests per minute
    timeout: float = 120.0
    max_retries: int = 5
    retry_delay: float = 1.0  # seconds before the first retry, doubled after each
    api_key_env: str = "OPENAI_API_KEY"
    max_image_side: int = 1024  # images sent larger are scaled down to this longest side (0: never)
    image_format: str = "jpeg"


class Teacher(Protocol):
    description: str  # what the records name as their teacher; never a credential

    def label(self, items: Iterable[LabelItem]) -> Iterator[tuple[LabelItem, Outcome]]:
        """Each item with its caption or failure, as they complete (not necessarily in order)."""

    def preview(self, item: LabelItem) -> str:
        """What would be sent for `item` (for --dry-run), without sending it or loading a model."""

    def estimate(self, count: int) -> str:
        """One line: the work `count` images take (requests or batches, and time where knowable)."""

    def close(self) -> None: ...


def parse_spec(spec: str) -> tuple[str, str]:
    """(kind, target) of a teacher spec, or a UserError listing the kinds."""
    kind, colon, target = spec.partition(":")
    if not colon or kind not in KINDS or not target:
        kinds = "; ".join(f"{name}: {help}" for name, (_, _, help) in KINDS.items())
        raise UserError(f"--teacher {spec[:200]!r}: expected KIND:TARGET, where KIND is one of {kinds}")
    return kind, target


def teacher_class(kind: str) -> type:
    module, name, _ = KINDS[kind]
    return getattr(importlib.import_module(module), name)


def load_teacher(spec: str, options: TeacherOptions, *, dry_run: bool = False) -> Teacher:
    """The teacher `spec` names. A dry run loads no model and contacts no endpoint."""
    kind, target = parse_spec(spec)
    return teacher_class(kind).from_spec(target, options, dry_run=dry_run)
