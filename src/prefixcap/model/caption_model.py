"""CaptionModel: frozen image encoder (CLIP, SigLIP, DINOv2) -> PrefixMapper -> causal LM decoder
(the ClipCap design; a resampler mapper reads the encoder's patch tokens instead of its pooled embedding).

A model directory is self-contained:

    config.json              CaptionConfig
    mapper.safetensors       PrefixMapper weights
    vision_encoder/          the image encoder's vision tower (absent when stored as a reference)
    decoder/                 the causal LM (absent when a frozen decoder is stored as a reference)
    decoder_adapter/         a LoRA-trained decoder's adapter, in PEFT's format (then there is no
                             decoder/: `config.decoder` names the base decoder; see prefixcap.model.lora)
    tokenizer/               the decoder's tokenizer
    image_processor/         the encoder's image processor

Everything loads from safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from prefixcap.errors import ModelLoadError
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.config import CONFIG_NAME, PATCH_MAPPERS, CaptionConfig, normalize_model_id
from prefixcap.model.encoders import ImageEncoder, load_image_encoder, load_image_processor
from prefixcap.model.generation import CaptionGeneration
from prefixcap.model.hf_loading import check_finite, first_names, hf_call, load_checked
from prefixcap.model.lora import ADAPTER_DIR, ADAPTER_WEIGHTS, has_adapter, load_adapter, save_adapter
from prefixcap.model.mappers import PrefixMapper
from prefixcap.system.atomic import atomic_dir, check_output_dir

MAPPER_WEIGHTS = "mapper.safetensors"
MODEL_DIRECTORY = "prefixcap model directory"
# Every entry save_pretrained may write (see the module docstring); anything else in a model
# folder is the user's, and is never deleted.
MODEL_ENTRIES = (CONFIG_NAME, MAPPER_WEIGHTS, "vision_encoder", "decoder", ADAPTER_DIR, "tokenizer", "image_processor")


def check_model_output(directory: str | Path, *, overwrite: bool, keep_foreign: bool = False) -> None:
    """Refuse to write a model directory where it would delete, or mix into, what prefixcap did
    not write (`check_output_dir`): a model folder is recognised by its exact contents, and one
    that also holds other entries is refused, or with `keep_foreign` replaced with those entries
    kept (training's best/, where `evaluate --out RUN/best/eval` may be running)."""
    check_output_dir(
        directory, what=MODEL_DIRECTORY, is_ours=_has_model_files, overwrite=overwrite, entries=MODEL_ENTRIES,
        keep_foreign=keep_foreign,
    )  # fmt: skip


def _has_model_files(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / MAPPER_WEIGHTS).is_file()


class CaptionModel(nn.Module, CaptionGeneration):
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

    # ------------------------------------------------------------------ building and loading
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
        decoder_model = _load_decoder(decoder)
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
        return cls(config, encoder_model, decoder_model, _load_tokenizer(decoder), load_image_processor(vision_encoder))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        merge_adapter: bool = True,
    ) -> CaptionModel:
        """Load a local model directory. Names and hub ids are the registry's job (`prefixcap.load_model`),
        so that the model class does not depend on the converter and the hub.

        A LoRA-trained decoder (`decoder_adapter/`) is its base decoder with the adapter merged in: a
        plain Hugging Face model, decoded at full speed. `merge_adapter=False` keeps the adapter as
        separate trainable layers instead (to continue training it)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelLoadError(
                f"{directory}: not a model directory; for a registered name or hub id use "
                "prefixcap.load_model(...) or Captioner.from_pretrained(...)"
            )
        config = CaptionConfig.load(directory)
        decoder_part = [ADAPTER_DIR] if config.decoder_adapter else [] if config.freeze_decoder else ["decoder"]
        for required in ["tokenizer", "image_processor", *decoder_part]:
            if not (directory / required).is_dir():
                raise ModelLoadError(f"{directory}: missing {required}/ (the directory is incomplete)")
        decoder, decoder_source = _load_decoder_of(directory, config, merge_adapter)
        components = (
            load_image_encoder(_local_or(directory / "vision_encoder", config.vision_encoder)),
            decoder,
            _load_tokenizer(directory / "tokenizer"),
            load_image_processor(directory / "image_processor"),
        )
        try:  # sizes, stop token and generation defaults that do not fit the components
            model = cls(config, *components)
        except ModelLoadError as error:
            raise ModelLoadError(f"{directory / CONFIG_NAME}: {error}") from None
        model.decoder_source = decoder_source
        mapper_path = directory / MAPPER_WEIGHTS
        if not mapper_path.is_file():
            raise ModelLoadError(f"{directory}: missing {MAPPER_WEIGHTS}")
        load_weights(model.mapper, read_safetensors(mapper_path), mapper_path)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory: str | Path, *, save_frozen: bool = True, keep_foreign: bool = False) -> None:
        """Write a model directory atomically. `save_frozen=False` stores frozen parts (the image
        encoder, and a frozen decoder) as references to their hub ids instead of copying them.
        An existing model directory is replaced (as Hugging Face's `save_pretrained` does); any
        other non-empty folder is refused, never deleted. A model directory that also holds
        other entries is refused too, or, with `keep_foreign`, replaced with them kept."""
        check_model_output(directory, overwrite=True, keep_foreign=keep_foreign)
        with atomic_dir(directory, ours=MODEL_ENTRIES) as staging:
            adapter = has_adapter(self.decoder)
            if adapter and self.decoder_source is None:
                raise ValueError(
                    "cannot save a LoRA adapter whose base decoder exists only in memory (it has another adapter "
                    "merged in): load that model with merge_adapter=False to train its own adapter"
                )
            saved = dataclasses.replace(self.config, decoder_adapter=adapter)
            if adapter:  # the base the adapter applies to
                saved.decoder = self.decoder_source
            saved.save(staging)
            save_file({k: v.contiguous() for k, v in self.mapper.state_dict().items()}, staging / MAPPER_WEIGHTS)
            if save_frozen:
                self.vision_encoder.save_pretrained(staging / "vision_encoder")
            if adapter:  # LoRA: the adapter only, megabytes; the base decoder stays a reference
                save_adapter(self.decoder, staging / ADAPTER_DIR, base=saved.decoder)
            elif save_frozen or not self.config.freeze_decoder:
                self.decoder.save_pretrained(staging / "decoder")
            self.tokenizer.save_pretrained(staging / "tokenizer")
            self.image_processor.save_pretrained(staging / "image_processor")

    def push_to_hub(
        self, repo_id: str, *, private: bool = False, commit_message: str = "Upload prefixcap model"
    ) -> str:
        """Upload a self-contained model directory to the Hugging Face hub; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as staging:
            self.save_pretrained(Path(staging) / "model")
            info = api.upload_folder(
                repo_id=repo_id, folder_path=Path(staging) / "model", commit_message=commit_message
            )
        return str(info)

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
        return cls(config, _load_tokenizer(directory / "tokenizer"), positions)

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


# ---------------------------------------------------------------------- component loaders
def _load_decoder(source: str | Path) -> PreTrainedModel:
    return load_checked(AutoModelForCausalLM.from_pretrained, source, "decoder")


def _load_decoder_of(directory: Path, config: CaptionConfig, merge_adapter: bool) -> tuple[PreTrainedModel, str | None]:
    """The decoder of a model directory (its own copy, or the base decoder it refers to, plus its
    LoRA adapter, merged unless `merge_adapter` is False) and where its base weights load from
    (None for merged ones). `config.decoder_adapter` then says whether the decoder still carries
    the adapter as separate layers."""
    local = directory / "decoder"
    source = str(local.resolve()) if local.is_dir() else config.decoder
    decoder = _load_decoder(source)
    if config.decoder_adapter:
        weights_path = directory / ADAPTER_DIR / ADAPTER_WEIGHTS
        if not weights_path.is_file():
            raise ModelLoadError(f"{directory}: missing {ADAPTER_DIR}/{ADAPTER_WEIGHTS}")
        weights = read_safetensors(weights_path)
        check_finite(weights, weights_path)
        decoder = load_adapter(decoder, directory / ADAPTER_DIR, weights, merge=merge_adapter)
        config.decoder_adapter = not merge_adapter
        source = None if merge_adapter else source
    return decoder, source


def _load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    return hf_call(AutoTokenizer.from_pretrained, source, "tokenizer")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged one (empty, truncated, bad header) is one line."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{path}: damaged safetensors file ({error})") from None


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, *, prefix: str = "") -> None:
    """`module.load_state_dict(state)`, with one line naming `source` and the tensor (as the file
    names it: `prefix` + key) for a missing or unexpected tensor, a wrong shape or non-finite values."""
    expected = module.state_dict()
    if expected.keys() - state.keys():
        raise ModelLoadError(f"{source}: tensor {prefix}{first_names(expected.keys() - state.keys())} is missing")
    if state.keys() - expected.keys():
        raise ModelLoadError(f"{source}: unexpected tensor {prefix}{first_names(state.keys() - expected.keys())}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelLoadError(
                f"{source}: tensor {prefix}{name} has shape {tuple(tensor.shape)}, but the model needs "
                f"{tuple(expected[name].shape)}"
            )
    check_finite(state, source, prefix=prefix)
    module.load_state_dict(state)


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


def _local_or(local: Path, reference: str) -> str | Path:
    return local if local.is_dir() else reference
