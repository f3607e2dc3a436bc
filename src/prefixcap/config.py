"""The typed configuration of a caption model, stored as `config.json` in a model directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixcap.errors import ModelLoadError

CONFIG_NAME = "config.json"
DEFAULT_VISION_ENCODER = "openai/clip-vit-base-patch32"  # ClipCap's and the seed's CLIP ViT-B/32
MAPPER_KINDS = ("linear", "mlp", "transformer")


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

    def __post_init__(self) -> None:
        if self.mapper not in MAPPER_KINDS:
            raise ModelLoadError(f"unknown mapper kind {self.mapper!r}; choose one of {MAPPER_KINDS}")
        if self.prefix_length < 1:
            raise ModelLoadError(f"prefix_length must be >= 1, got {self.prefix_length}")

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "CaptionConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ModelLoadError(f"{directory}: not a prefixcap model directory (no {CONFIG_NAME})")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{path}: invalid JSON ({error})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelLoadError(f"{path}: unknown config keys {unknown}")
        return cls(**values)
