"""Frozen image encoders behind one small interface: CLIP, SigLIP (and fixed-resolution SigLIP 2)
and DINOv2 towers, each giving a pooled embedding [B, embed_dim] or patch tokens [B, N, patch_dim].
Each family is one `ENCODERS` entry (its configs, loader, widths and forward): a new family is one entry.

    family   checkpoints (model_type)                      pooled                     patch tokens
    clip     clip, clip_vision_model (OpenAI, LAION, DFN)  projected image_embeds     last_hidden_state minus CLS
    siglip   siglip, siglip_vision_model (SigLIP 1 and 2)  pooler_output (MAP head)   last_hidden_state
    dinov2   dinov2, dinov2_with_registers                 pooler_output (CLS, normed) last_hidden_state minus CLS
                                                                                      and register tokens

Patch tokens are the spatial grid only: the CLS (and register) tokens summarise the image and
are what the pooled embedding is made of already, and a resampler's queries attend better over a
homogeneous set of tokens (as in LLaVA and BLIP-2). CLIP's tokens are taken as its last layer
gives them, without the post-layernorm that CLIP applies to CLS alone (LLaVA does the same): the
resampler normalises its input itself. SigLIP's and DINOv2's last_hidden_state are normalised by
their models already.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    CLIPVisionModelWithProjection,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
)

from prefixcap.errors import ModelLoadError
from prefixcap.model.hf_loading import hf_call, load_checked

_REFUSED = {
    "siglip2": "SigLIP 2 NaFlex checkpoints (model_type 'siglip2', variable resolution) are not supported; "
    "use a fixed-resolution SigLIP 2 checkpoint such as google/siglip2-base-patch16-224",
}


@dataclass(frozen=True)
class EncoderFamily:
    """Everything prefixcap knows about one family of vision towers. The image processor needs no
    entry: transformers' AutoImageProcessor reads it from any of them."""

    name: str  # clip | siglip | dinov2
    title: str  # as messages write it: CLIP, SigLIP, DINOv2
    model_types: tuple[str, ...]  # the vision towers' config model_type
    loader: Callable[..., PreTrainedModel]  # from_pretrained of the class the tower loads as
    embed_dim: Callable[[PretrainedConfig], int]  # the pooled embedding's width
    leading_tokens: Callable[[PretrainedConfig], int]  # tokens before the patches (CLS, registers)
    forward: Callable[[PreTrainedModel, torch.Tensor, bool, int], torch.Tensor]  # (model, pixels, patches, leading)
    # A full two-tower checkpoint's model_type -> its vision tower's config
    two_tower: Mapping[str, Callable[[PretrainedConfig], PretrainedConfig]] = field(default_factory=dict)
    refuse: Callable[[PretrainedConfig], str | None] = lambda config: None  # why a tower cannot serve


def _clip_tower(config: PretrainedConfig) -> PretrainedConfig:
    """A full CLIP checkpoint's vision config, with its projection size (which lives at top level)."""
    vision_config = config.vision_config
    vision_config.projection_dim = config.projection_dim
    return vision_config


def _clip_forward(model: PreTrainedModel, pixel_values: torch.Tensor, patches: bool, leading: int) -> torch.Tensor:
    if patches:  # the tower alone: the projection serves the pooled embedding only
        return model.vision_model(pixel_values=pixel_values).last_hidden_state[:, leading:]
    return model(pixel_values=pixel_values).image_embeds


def _pooler_forward(model: PreTrainedModel, pixel_values: torch.Tensor, patches: bool, leading: int) -> torch.Tensor:
    output = model(pixel_values=pixel_values)
    return output.last_hidden_state[:, leading:] if patches else output.pooler_output


ENCODERS: dict[str, EncoderFamily] = {
    family.name: family
    for family in (
        EncoderFamily(
            "clip", "CLIP", ("clip_vision_model",), CLIPVisionModelWithProjection.from_pretrained,
            embed_dim=lambda config: config.projection_dim, leading_tokens=lambda config: 1,
            forward=_clip_forward, two_tower={"clip": _clip_tower},
        ),
        EncoderFamily(  # SiglipVisionModel reads the vision tower's tensors of a full SiglipModel too
            "siglip", "SigLIP", ("siglip_vision_model",), SiglipVisionModel.from_pretrained,
            embed_dim=lambda config: config.hidden_size, leading_tokens=lambda config: 0,
            forward=_pooler_forward, two_tower={"siglip": lambda config: config.vision_config},
            refuse=lambda config: None if getattr(config, "vision_use_head", True)
            else "this SigLIP tower has no pooling head (vision_use_head is false)",
        ),
        EncoderFamily(
            "dinov2", "DINOv2", ("dinov2", "dinov2_with_registers"), AutoModel.from_pretrained,
            embed_dim=lambda config: config.hidden_size,
            leading_tokens=lambda config: 1 + getattr(config, "num_register_tokens", 0),
            forward=_pooler_forward,
        ),
    )
}  # fmt: skip
_BY_MODEL_TYPE = {model_type: family for family in ENCODERS.values() for model_type in family.model_types}
_TWO_TOWERS = {model_type: read for family in ENCODERS.values() for model_type, read in family.two_tower.items()}


class EncoderSpec(NamedTuple):
    """What an encoder's config says about its outputs, known without loading any weights."""

    family: str  # clip | siglip | dinov2
    embed_dim: int  # width of the pooled embedding
    patch_dim: int  # width of each patch token
    patch_size: int  # pixels per patch side: N = (H // patch_size) * (W // patch_size)
    leading_tokens: int  # tokens before the patches in last_hidden_state (CLS, registers)

    def num_patches(self, height: int, width: int) -> int:
        """Patch tokens the encoder gives for [height, width] pixel inputs."""
        return (height // self.patch_size) * (width // self.patch_size)


def load_encoder_config(source: str | Path) -> tuple[EncoderSpec, PretrainedConfig]:
    """The vision tower's config of a checkpoint (a full two-tower model or a vision-only one) and
    its EncoderSpec; anything but the supported families is refused in one line."""
    config = hf_call(AutoConfig.from_pretrained, source, "image encoder config")
    if config.model_type in _TWO_TOWERS:  # a full two-tower checkpoint: read as its vision tower
        config = _TWO_TOWERS[config.model_type](config)
    if config.model_type in _REFUSED:
        raise ModelLoadError(f"{source}: {_REFUSED[config.model_type]}")
    family = _BY_MODEL_TYPE.get(config.model_type)
    if family is None:
        *others, last = (family.title for family in ENCODERS.values())
        raise ModelLoadError(
            f"{source}: expected a {', '.join(others)} or {last} image encoder, found model_type {config.model_type!r}"
        )
    if reason := family.refuse(config):
        raise ModelLoadError(f"{source}: {reason}")
    spec = EncoderSpec(
        family.name, family.embed_dim(config), config.hidden_size, config.patch_size, family.leading_tokens(config)
    )
    return spec, config


class ImageEncoder(nn.Module):
    """A frozen vision tower: `encoder(pixel_values)` is the pooled embedding [B, embed_dim],
    `encoder(pixel_values, patches=True)` the patch tokens [B, N, patch_dim]."""

    def __init__(self, model: PreTrainedModel, spec: EncoderSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def patch_dim(self) -> int:
        return self.spec.patch_dim

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, pixel_values: torch.Tensor, *, patches: bool = False) -> torch.Tensor:
        return ENCODERS[self.family].forward(self.model, pixel_values, patches, self.spec.leading_tokens)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        """The tower as a vision-only checkpoint, which `load_image_encoder` reads back."""
        self.model.save_pretrained(directory, **kwargs)


def load_image_encoder(source: str | Path) -> ImageEncoder:
    """The image encoder of a hub id or folder; its family follows from the config's model_type."""
    spec, config = load_encoder_config(source)
    loader = ENCODERS[spec.family].loader
    return ImageEncoder(load_checked(loader, source, "image encoder", config=config), spec)


def load_image_processor(source: str | Path) -> Any:
    """The encoder's Hugging Face image processor, in its PIL backend (CLIPImageProcessorPil,
    SiglipImageProcessorPil, BitImageProcessorPil for DINOv2), which `ImagePreprocessor` matches
    bit for bit."""
    return hf_call(AutoImageProcessor.from_pretrained, source, "image processor", backend="pil")
