"""CaptionModel: frozen image encoder (CLIP, SigLIP, DINOv2) -> PrefixMapper -> causal LM decoder
(the ClipCap design; a resampler mapper reads the encoder's patch tokens instead of its pooled embedding).
The module only: the text policy is `prefixcap.model.generation`'s, the model directory format
`prefixcap.model.directory`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from prefixcap.errors import ModelLoadError
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.config import PATCH_MAPPERS, CaptionConfig, normalize_model_id
from prefixcap.model.directory import ModelDirectory, load_decoder, load_tokenizer
from prefixcap.model.encoders import ImageEncoder, load_image_encoder, load_image_processor
from prefixcap.model.generation import CaptionGeneration
from prefixcap.model.hf_loading import hf_call
from prefixcap.model.mappers import PrefixMapper


class CaptionModel(nn.Module, CaptionGeneration, ModelDirectory):
    """The module: encoder -> mapper -> decoder, and its forward passes. Generation and text come
    from CaptionGeneration, loading and saving a model directory from ModelDirectory."""

    def __init__(
        self,
        config: CaptionConfig,
        vision_encoder: ImageEncoder,
        decoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        mapper: PrefixMapper | None = None,
    ):
        super().__init__()
        _check_sizes(config, vision_encoder, decoder)
        self.config = config
        self.vision_encoder = vision_encoder.eval().requires_grad_(False)
        self.mapper = mapper if mapper is not None else PrefixMapper(config)
        self.decoder = decoder
        # Where the decoder's base weights load from, for a LoRA adapter's reference (None: only in memory)
        self.decoder_source: str | None = config.decoder
        if config.freeze_decoder:
            self.decoder.requires_grad_(False)
        if tokenizer.pad_token_id is None:  # GPT-2 has no pad token; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.preprocessor = ImagePreprocessor(image_processor)  # uint8 in workers, floats on the device
        self._check_defaults()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_components(
        cls,
        vision_encoder: str = CaptionConfig.vision_encoder,
        decoder: str = CaptionConfig.decoder,
        mapper: str = CaptionConfig.mapper,
        prefix_length: int = CaptionConfig.prefix_length,
        freeze_decoder: bool = CaptionConfig.freeze_decoder,
        **config_overrides: Any,
    ) -> CaptionModel:
        """A new model with an untrained mapper, from an encoder and a decoder (hub ids or dirs)."""
        encoder_model = load_image_encoder(vision_encoder)
        decoder_model = load_decoder(decoder)
        config = CaptionConfig(
            vision_encoder=str(vision_encoder),
            decoder=normalize_model_id(decoder),  # absolute: a LoRA model directory refers to it
            mapper=mapper,
            prefix_length=prefix_length,
            embed_dim=_encoder_width(encoder_model, mapper in PATCH_MAPPERS),
            decoder_hidden_size=decoder_model.get_input_embeddings().embedding_dim,
            freeze_decoder=freeze_decoder,
            **config_overrides,
        )
        return cls(config, encoder_model, decoder_model, load_tokenizer(decoder), load_image_processor(vision_encoder))

    # ------------------------------------------------------------------ forward passes
    @property
    def image_processor(self) -> Any:
        """The encoder's Hugging Face image processor (what `preprocessor` splits)."""
        return self.preprocessor.processor

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the mapper reads, of the image processor's (float) output: pooled embeddings
        [B, embed_dim] (CLIP's `get_image_features`), or patch tokens [B, N, embed_dim] for a
        resampler mapper."""
        return embed_pixel_values(self.vision_encoder, pixel_values, patches=self.config.uses_patches)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """`encode_images` of uint8 pixels from `preprocessor.pixels`."""
        return embed_pixels(self.vision_encoder, self.preprocessor, pixels, patches=self.config.uses_patches)

    def prefix_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Mapper output [B, K, hidden], in the decoder's dtype."""
        mapper_dtype = next(self.mapper.parameters()).dtype
        prefix = self.mapper(image_embeds.to(self.device, mapper_dtype))
        return prefix.to(self.decoder.dtype)

    def _image_embeds(
        self, pixels: torch.Tensor | None, pixel_values: torch.Tensor | None, image_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """The image embeddings of exactly one of: uint8 `pixels`, float `pixel_values` (an image
        processor's output) or `image_embeds` themselves."""
        if sum(given is not None for given in (pixels, pixel_values, image_embeds)) != 1:
            raise ValueError("pass exactly one of pixels, pixel_values or image_embeds")
        if pixels is not None:
            return self.encode_pixels(pixels)
        if pixel_values is not None:
            return self.encode_images(pixel_values)
        return self.check_image_embeds(image_embeds)

    def check_image_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`image_embeds` if they have the shape the mapper reads, else a ValueError saying why."""
        patches = self.config.uses_patches
        if image_embeds.dim() != (3 if patches else 2):
            expected = "patch tokens [B, N, D]" if patches else "pooled embeddings [B, D]"
            raise ValueError(
                f"image_embeds have shape {tuple(image_embeds.shape)}, but this model's {self.config.mapper} "
                f"mapper reads {expected} (features of the other kind: `prefixcap prepare --features "
                f"{'patches' if patches else 'pooled'}`)"
            )
        if image_embeds.shape[-1] != self.config.embed_dim:
            raise ValueError(
                f"image_embeds have size {image_embeds.shape[-1]}, but this model's mapper expects "
                f"{self.config.embed_dim} (features from a different image encoder?)"
            )
        return image_embeds

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        *,
        pixels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder input embeddings [B, K + T, hidden]: the prefix, then the caption tokens'
        embeddings. The one place both `forward` and the training loss build them."""
        prefix = self.prefix_embeds(self._image_embeds(pixels, pixel_values, image_embeds))
        return torch.cat([prefix, self.decoder.get_input_embeddings()(input_ids)], dim=1)

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithCrossAttentions:
        """Teacher-forced pass over [prefix; caption tokens]. Logits cover both; the loss ignores the
        prefix and every label set to -100 (padding)."""
        embeds = self.embed_inputs(input_ids, pixels=pixels, pixel_values=pixel_values, image_embeds=image_embeds)
        batch, prefix_length = input_ids.shape[0], self.config.prefix_length
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefix_mask = attention_mask.new_ones(batch, prefix_length)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, prefix_length), -100), labels], dim=1)
        return self.decoder(
            inputs_embeds=embeds, attention_mask=torch.cat([prefix_mask, attention_mask], dim=1), labels=labels
        )

    # ------------------------------------------------------------------ what generation needs (CaptionGeneration)
    def image_prefix(
        self, pixel_values: torch.Tensor | None, pixels: torch.Tensor | None, image_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        return self.prefix_embeds(self._image_embeds(pixels, pixel_values, image_embeds))

    def token_embeddings(self, token_ids: list[int], like: torch.Tensor) -> torch.Tensor:
        embedding = self.decoder.get_input_embeddings()
        return embedding(torch.tensor(token_ids, device=embedding.weight.device)).to(like)

    @property
    def max_new_tokens_limit(self) -> int | None:
        """The longest caption that fits in the decoder's positions after the prefix."""
        positions = getattr(self.decoder.config, "max_position_embeddings", None)
        return None if positions is None else positions - self.config.prefix_length


class CaptionText(CaptionGeneration):
    """The text side of a saved model without its weights (config, tokenizer, the decoder's
    positions): enough to build and check requests where the model itself runs elsewhere, such as
    a Ray driver whose actors caption. It generates nothing."""

    def __init__(self, config: CaptionConfig, tokenizer: PreTrainedTokenizerBase, max_positions: int | None):
        self.config, self.tokenizer, self._max_positions = config, tokenizer, max_positions
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._check_defaults()

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CaptionText:
        directory = Path(directory)
        config = CaptionConfig.load(directory)
        local = directory / "decoder"
        decoder_config = hf_call(
            AutoConfig.from_pretrained, local if local.is_dir() else config.decoder, "decoder config"
        )
        positions = getattr(decoder_config, "max_position_embeddings", None)
        return cls(config, load_tokenizer(directory / "tokenizer"), positions)

    @property
    def max_new_tokens_limit(self) -> int | None:
        return None if self._max_positions is None else self._max_positions - self.config.prefix_length


# ---------------------------------------------------------------------- the encode step
@torch.no_grad()
def embed_pixels(
    vision_encoder: ImageEncoder, preprocessor: ImagePreprocessor, pixels: torch.Tensor, *, patches: bool = False
) -> torch.Tensor:
    """Pooled embeddings [B, D] (patch tokens [B, N, D] with `patches`) of uint8 pixels
    [B, 3, H, W] (`ImagePreprocessor.pixels`): moved to the encoder's device (without waiting,
    from pinned memory), normalised there, encoded."""
    pixels = pixels.to(vision_encoder.device, non_blocking=True)
    return embed_pixel_values(vision_encoder, preprocessor.normalize(pixels), patches=patches)


@torch.no_grad()
def embed_pixel_values(
    vision_encoder: ImageEncoder, pixel_values: torch.Tensor, *, patches: bool = False
) -> torch.Tensor:
    """Pooled embeddings [B, D] (patch tokens [B, N, D] with `patches`) of normalised float pixel
    values (an image processor's output)."""
    if not pixel_values.is_floating_point():
        raise TypeError(
            "pixel_values are an image processor's normalised floats; pass uint8 pixels from "
            "pixels()/load_pixels() as pixels="
        )
    pixel_values = pixel_values.to(vision_encoder.device, vision_encoder.dtype)
    return vision_encoder(pixel_values, patches=patches)


def _encoder_width(encoder: ImageEncoder, patches: bool) -> int:
    """The width of what `encoder` gives the mapper: patch tokens' or the pooled embedding's."""
    return encoder.patch_dim if patches else encoder.embed_dim


def _check_sizes(config: CaptionConfig, encoder: ImageEncoder, decoder: PreTrainedModel) -> None:
    encoder_dim = _encoder_width(encoder, config.uses_patches)
    if encoder_dim != config.embed_dim:
        kind = "patch tokens" if config.uses_patches else "embeddings"
        raise ModelLoadError(
            f"image encoder {config.vision_encoder!r} gives {encoder_dim}-d {kind}, but the mapper "
            f"expects {config.embed_dim}-d; use the encoder the model was trained with"
        )
    hidden = decoder.get_input_embeddings().embedding_dim
    if hidden != config.decoder_hidden_size:
        raise ModelLoadError(
            f"decoder {config.decoder!r} has hidden size {hidden}, but the mapper produces "
            f"{config.decoder_hidden_size}-d prefixes; use the decoder the model was trained with"
        )
