"""The typed configuration of a caption model, stored as `config.json` in a model directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixcap.errors import ModelLoadError
from prefixcap.model.mappers import MAPPERS
from prefixcap.options import MAX_TEXT_CHARS, GenerationOptions, clean_prompt
from prefixcap.options.fields import between, check_fields, field_bounds, option
from prefixcap.options.text import template_problem

CONFIG_NAME = "config.json"
DEFAULT_VISION_ENCODER = "openai/clip-vit-base-patch32"  # CLIP ViT-B/32, as in ClipCap
MAPPER_KINDS = tuple(MAPPERS)
# Mappers that read the encoder's patch tokens [B, N, patch_dim] instead of its pooled embedding.
PATCH_MAPPERS = tuple(name for name, kind in MAPPERS.items() if kind.reads_patches)
# What a feature store holds per image: the pooled embedding, or the patch tokens (for PATCH_MAPPERS).
FEATURE_KINDS = ("pooled", "patches")
MAX_RETRIEVE_K = 64  # retrieved captions per image: SmallCap uses 4; far more would not fit a prompt
MAX_RETRIEVAL_PROMPT_TOKENS = 16384  # far above any decoder's positions, as the sizes' bounds
RETRIEVAL_FIELDS = ("retrieval_k", "retrieval_template", "retrieval_prompt_tokens")


@dataclass
class CaptionConfig:
    """A model's architecture and defaults. The sizes' upper bounds (their fields' `bounds`) are far
    above real models (GPT-2 XL is 1600 wide, ClipCap uses K = 10..40), so that a damaged or hostile
    config.json fails before anything is allocated."""

    vision_encoder: str = DEFAULT_VISION_ENCODER  # hub id or dir of the frozen image encoder (CLIP, SigLIP, DINOv2)
    decoder: str = "gpt2"  # hub id or dir of the causal LM the decoder started from
    mapper: str = "mlp"  # prefix mapper kind: a MAPPERS entry (linear | mlp | transformer | resampler)
    prefix_length: int = option(10, "K, the number of prefix embeddings given to the decoder", bounds=between(1, 1024))
    embed_dim: int = option(
        512, "the mapper's input width: the pooled embedding's, or a patch token's", bounds=between(1, 16384)
    )
    decoder_hidden_size: int = option(
        768, "size of the decoder's input embeddings (mapper output)", bounds=between(1, 16384)
    )
    mapper_num_layers: int = option(8, "attention layers", bounds=between(1, 64))
    mapper_num_heads: int = option(8, "attention heads", bounds=between(1, 256))
    mapper_clip_length: int = option(10, "tokens the image embedding is expanded to", bounds=between(1, 1024))
    mapper_width: int | None = option(
        None, "width of its queries and layers (default: the decoder's hidden size)", bounds=between(1, 16384)
    )
    freeze_decoder: bool = False  # True: only the mapper is trained (ClipCap's prefix-only mode)
    decoder_adapter: bool = False  # True: the decoder is `decoder` plus the LoRA adapter in decoder_adapter/
    stop_token: str | None = None  # text that ends a caption besides EOS ("." for ClipCap imports)
    generation: dict[str, Any] = field(default_factory=lambda: {"max_new_tokens": 30})  # defaults
    prompt: str | None = None  # the prompt the model was trained with: captioning's default prompt
    # A retrieval-augmented model (`train --datastore`): each image's prompt is the captions of its
    # retrieval_k nearest in a datastore, put in retrieval_template and kept within
    # retrieval_prompt_tokens decoder tokens (prefixcap.retrieval). All None: trained without retrieval.
    retrieval_k: int | None = option(None, "captions retrieved per image", bounds=between(1, MAX_RETRIEVE_K))
    retrieval_template: str | None = None
    retrieval_prompt_tokens: int | None = option(
        None, "most decoder tokens of a retrieval prompt", bounds=between(1, MAX_RETRIEVAL_PROMPT_TOKENS)
    )

    def __post_init__(self) -> None:
        """Check every field's type and range: config.json may hold anything (`"10"`, `10.0`,
        `"no"` for a bool), and a wrong value must fail here, not deep inside torch."""
        check_fields(
            type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, error=ModelLoadError
        )
        if self.mapper not in MAPPER_KINDS:
            raise ModelLoadError(f"unknown mapper kind {self.mapper!r}; choose one of {MAPPER_KINDS}")
        if problem := MAPPERS[self.mapper].problem(self):
            raise ModelLoadError(problem)
        self._check_generation()
        prompt = self.prompt
        if prompt is not None and not (0 < len(prompt) <= MAX_TEXT_CHARS and clean_prompt(prompt) == prompt):
            raise ModelLoadError(
                f"prompt must be non-empty text of at most {MAX_TEXT_CHARS} characters without surrounding or "
                f"repeated whitespace, got {self.prompt[:100]!r}"
            )
        self._check_retrieval()

    @property
    def uses_retrieval(self) -> bool:
        """Whether the model was trained with retrieved captions in its prompt."""
        return self.retrieval_k is not None

    def _check_retrieval(self) -> None:
        """The retrieval fields are all set (with a valid template, and no fixed prompt) or all None."""
        given = [getattr(self, name) is not None for name in RETRIEVAL_FIELDS]
        if any(given) and not all(given):
            raise ModelLoadError(f"{', '.join(RETRIEVAL_FIELDS)} must be all set or all null")
        if not all(given):
            return
        problem = template_problem(self.retrieval_template)
        if problem is not None or self.retrieval_template != " ".join(self.retrieval_template.split()):
            raise ModelLoadError(f"retrieval_template: {problem or 'surrounding or repeated whitespace'}")
        if self.prompt is not None:
            raise ModelLoadError("prompt must be null in a retrieval model: retrieved captions make each prompt")

    @property
    def uses_patches(self) -> bool:
        """Whether the mapper reads patch tokens [B, N, embed_dim] rather than pooled embeddings [B, embed_dim]."""
        return MAPPERS[self.mapper].reads_patches

    @property
    def resampler_width(self) -> int:
        return self.mapper_width or self.decoder_hidden_size

    def _check_generation(self) -> None:
        """The generation defaults must be valid GenerationOptions. The types are checked here too,
        for messages naming the key in config.json (`generation.max_new_tokens`)."""
        check_fields(GenerationOptions, self.generation, prefix="generation.", error=ModelLoadError, ranges=False)
        try:
            GenerationOptions.from_kwargs(self.generation)
        except ValueError as error:
            raise ModelLoadError(f"generation: {error}") from None

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> CaptionConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ModelLoadError(f"{directory}: not a prefixcap model directory (no {CONFIG_NAME})")
        try:
            values = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as error:  # bad JSON, not UTF-8, absurdly nested
            raise ModelLoadError(f"{path}: not valid UTF-8 JSON ({error})") from None
        if not isinstance(values, dict):
            raise ModelLoadError(f"{path}: expected a JSON object, found {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelLoadError(f"{path}: unknown config keys {unknown}")
        try:
            return cls(**values)
        except ModelLoadError as error:
            raise ModelLoadError(f"{path}: {error}") from None


def mapper_option_help(name: str) -> str:
    """The help of a mapper's size field, naming the mappers that read it ("transformer and
    resampler mappers: attention layers")."""
    kinds = [kind.name for kind in MAPPERS.values() if name in kind.fields]
    which = f"{', '.join(kinds[:-1])} and {kinds[-1]} mappers" if len(kinds) > 1 else f"{kinds[0]} mapper"
    return f"{which}: {CONFIG_FIELDS[name].metadata['help']}"


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(CaptionConfig)}
# The largest value of each size, for checks of what a config will hold (a ClipCap checkpoint's K).
SIZE_LIMITS = {name: int(bounds.high) for name, bounds in field_bounds(CaptionConfig).items()}


def normalize_model_id(source: str | Path) -> str:
    """A local model or encoder folder as an absolute path (so that it compares equal from any
    working directory); a hub id as given."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)
