"""The model directory format: what `CaptionModel.from_pretrained` reads and `save_pretrained` writes
(the `ModelDirectory` mixin), and the checked loaders of its parts. A model directory is self-contained:

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prefixcap.errors import ModelLoadError
from prefixcap.model.config import CONFIG_NAME, CaptionConfig
from prefixcap.model.encoders import load_image_encoder, load_image_processor
from prefixcap.model.hf_loading import check_finite, hf_call, load_checked, load_weights, read_safetensors
from prefixcap.model.lora import ADAPTER_DIR, ADAPTER_WEIGHTS, has_adapter, load_adapter, save_adapter
from prefixcap.system.atomic import atomic_dir, check_output_dir

if TYPE_CHECKING:
    from torch import nn

    from prefixcap.model.encoders import ImageEncoder
    from prefixcap.model.mappers import PrefixMapper

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


M = TypeVar("M", bound="ModelDirectory")


class ModelDirectory:
    """Reading and writing a model as a directory, for an nn.Module built as
    `cls(config, vision_encoder, decoder, tokenizer, image_processor)` (CaptionModel)."""

    config: CaptionConfig
    vision_encoder: ImageEncoder
    mapper: PrefixMapper
    decoder: nn.Module
    decoder_source: str | None  # where the decoder's base weights load from (None: only in memory)
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any

    @classmethod
    def from_pretrained(
        cls: type[M],
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        merge_adapter: bool = True,
    ) -> M:
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
            load_tokenizer(directory / "tokenizer"),
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


# ---------------------------------------------------------------------- the parts' loaders
def load_decoder(source: str | Path) -> PreTrainedModel:
    return load_checked(AutoModelForCausalLM.from_pretrained, source, "decoder")


def _load_decoder_of(directory: Path, config: CaptionConfig, merge_adapter: bool) -> tuple[PreTrainedModel, str | None]:
    """The decoder of a model directory (its own copy, or the base decoder it refers to, plus its
    LoRA adapter, merged unless `merge_adapter` is False) and where its base weights load from
    (None for merged ones). `config.decoder_adapter` then says whether the decoder still carries
    the adapter as separate layers."""
    local = directory / "decoder"
    source = str(local.resolve()) if local.is_dir() else config.decoder
    decoder = load_decoder(source)
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


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    return hf_call(AutoTokenizer.from_pretrained, source, "tokenizer")


def _local_or(local: Path, reference: str) -> str | Path:
    return local if local.is_dir() else reference
