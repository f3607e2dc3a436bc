"""The typed configuration of a caption model, stored as `config.json` in a model directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixcap.errors import ModelLoadError
from prefixcap.options import MAX_TEXT_CHARS, GenerationOptions, clean_prompt
from prefixcap.typecheck import check_types

CONFIG_NAME = "config.json"
DEFAULT_VISION_ENCODER = "openai/clip-vit-base-patch32"  # ClipCap's and the seed's CLIP ViT-B/32
MAPPER_KINDS = ("linear", "mlp", "transformer")
# Upper bounds for every size in a config, far above real models (GPT-2 XL is 1600 wide, ClipCap
# uses K = 10..40), so that a damaged or hostile config.json fails before anything is allocated.
SIZE_LIMITS = {
    "prefix_length": 1024,
    "embed_dim": 16384,
    "decoder_hidden_size": 16384,
    "mapper_num_layers": 64,
    "mapper_num_heads": 256,
    "mapper_clip_length": 1024,
}


@dataclass
class CaptionConfig:
    vision_encoder: str = DEFAULT_VISION_ENCODER  # hub id or dir of the frozen CLIP encoder
    decoder: str = "gpt2"  # hub id or dir of the causal LM the decoder started from
    mapper: str = "mlp"  # prefix mapper kind: linear | mlp | transformer
    prefix_length: int = 10  # K, the number of prefix embeddings given to the decoder
    embed_dim: int = 512  # size of the encoder's projected image embedding (mapper input)
    decoder_hidden_size: int = 768  # size of the decoder's input embeddings (mapper output)
    mapper_num_layers: int = 8  # transformer mapper: attention layers
    mapper_num_heads: int = 8  # transformer mapper: attention heads
    mapper_clip_length: int = 10  # transformer mapper: tokens the image embedding is expanded to
    freeze_decoder: bool = False  # True: only the mapper is trained (ClipCap's prefix-only mode)
    stop_token: str | None = None  # text that ends a caption besides EOS ("." for ClipCap imports)
    generation: dict[str, Any] = field(default_factory=lambda: {"max_new_tokens": 30})  # defaults
    prompt: str | None = None  # the prompt the model was trained with: captioning's default prompt

    def __post_init__(self) -> None:
        """Check every field's type and range: config.json may hold anything (`"10"`, `10.0`,
        `"no"` for a bool), and a wrong value must fail here, not deep inside torch."""
        check_types(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, error=ModelLoadError)
        if self.mapper not in MAPPER_KINDS:
            raise ModelLoadError(f"unknown mapper kind {self.mapper!r}; choose one of {MAPPER_KINDS}")
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if not 1 <= value <= limit:
                raise ModelLoadError(f"{name} must be in [1, {limit}], got {value}")
        if self.mapper == "transformer" and self.decoder_hidden_size % self.mapper_num_heads:
            raise ModelLoadError(
                f"decoder_hidden_size {self.decoder_hidden_size} is not divisible by "
                f"mapper_num_heads {self.mapper_num_heads}"
            )
        self._check_generation()
        prompt = self.prompt
        if prompt is not None and not (0 < len(prompt) <= MAX_TEXT_CHARS and clean_prompt(prompt) == prompt):
            raise ModelLoadError(
                f"prompt must be non-empty text of at most {MAX_TEXT_CHARS} characters without surrounding or "
                f"repeated whitespace, got {self.prompt[:100]!r}"
            )

    def _check_generation(self) -> None:
        """The generation defaults must be valid GenerationOptions. The types are checked here too,
        for messages naming the key in config.json (`generation.max_new_tokens`)."""
        check_types(GenerationOptions, self.generation, prefix="generation.", error=ModelLoadError)
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


def normalize_model_id(source: str | Path) -> str:
    """A local model or encoder folder as an absolute path (so that it compares equal from any
    working directory); a hub id as given."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)
