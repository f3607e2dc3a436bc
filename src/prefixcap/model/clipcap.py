"""Import ClipCap checkpoints (rmokady/CLIP_prefix_caption, MLP mapper) as prefixcap models."""

from __future__ import annotations

from pathlib import Path

import torch

from prefixcap.errors import ModelLoadError, UserError
from prefixcap.model.caption_model import CaptionModel
from prefixcap.model.config import SIZE_LIMITS, CaptionConfig
from prefixcap.model.directory import check_model_output
from prefixcap.model.hf_loading import load_weights

# Old transformers versions saved GPT-2's causal-mask buffers; they are not weights.
_LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")
# ClipCap decodes at most 67 tokens and was trained without EOS, so "." ends a caption.
CLIPCAP_GENERATION = {"max_new_tokens": 67}


def load_clipcap_state(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a ClipCap state dict into (mapper, GPT-2) parts. Tensors only: weights_only=True."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"{checkpoint}: no such file") from None
    except Exception as error:  # torch raises many types for non-checkpoint files
        raise ModelLoadError(f"{checkpoint}: not a loadable tensor checkpoint ({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{checkpoint}: expected a state_dict of tensors")
    mapper = {k.removeprefix("clip_project."): v for k, v in state.items() if k.startswith("clip_project.")}
    gpt = {
        k.removeprefix("gpt."): v for k, v in state.items() if k.startswith("gpt.") and not k.endswith(_LEGACY_BUFFERS)
    }
    sized = [mapper.get("model.0.weight"), mapper.get("model.2.weight"), gpt.get("transformer.wte.weight")]
    mapper_keys = {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}
    if set(mapper) != mapper_keys or not all(w is not None and w.ndim == 2 and w.numel() for w in sized):
        raise ModelLoadError(
            f"{checkpoint}: not a ClipCap MLP checkpoint (expected clip_project.model.{{0,2}}.* and gpt.* keys, "
            "with 2-d weights)"
        )
    return mapper, gpt


def convert_clipcap(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    vision_encoder: str = CaptionConfig.vision_encoder,
    decoder: str = CaptionConfig.decoder,
    save_frozen: bool = True,
    overwrite: bool = False,
    max_new_tokens: int = CLIPCAP_GENERATION["max_new_tokens"],
) -> CaptionModel:
    """Build a prefixcap model from a ClipCap checkpoint; sizes come from the tensor shapes.
    `out_dir` must be missing, empty, or (with `overwrite`) a prefixcap model directory, and must
    not hold the checkpoint: it is replaced as a whole. `max_new_tokens` is the model's default
    caption length (ClipCap's 67 needs a decoder with room for it after the prefix)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if _lies_inside(checkpoint, out_dir):
        raise UserError(
            f"{checkpoint}: lies inside {out_dir}, which the model would replace; choose another output folder"
        )
    check_model_output(out_dir, overwrite=overwrite)
    mapper_state, gpt_state = load_clipcap_state(checkpoint)
    embed_dim = mapper_state["model.0.weight"].shape[1]
    prefix_width = mapper_state["model.2.weight"].shape[0]
    hidden_size = gpt_state["transformer.wte.weight"].shape[1]
    prefix_length, leftover = divmod(prefix_width, hidden_size)
    if leftover or not 1 <= prefix_length <= SIZE_LIMITS["prefix_length"]:
        raise ModelLoadError(
            f"{checkpoint}: mapper output {prefix_width} is not 1 to {SIZE_LIMITS['prefix_length']} times "
            f"the GPT-2 width {hidden_size}"
        )
    model = CaptionModel.from_components(
        vision_encoder,
        decoder,
        mapper="mlp",
        prefix_length=prefix_length,
        stop_token=".",
        generation={**CLIPCAP_GENERATION, "max_new_tokens": max_new_tokens},
    )
    if model.config.embed_dim != embed_dim:
        raise ModelLoadError(
            f"{checkpoint}: mapper takes {embed_dim}-d features but {vision_encoder} gives {model.config.embed_dim}-d"
        )
    load_weights(model.decoder, gpt_state, checkpoint, prefix="gpt.")  # first: a wrong --decoder shows as wte's shape
    load_weights(model.mapper.mapper, mapper_state, checkpoint, prefix="clip_project.")
    model.save_pretrained(out_dir, save_frozen=save_frozen)
    return model


def _lies_inside(path: Path, folder: Path) -> bool:
    """Whether `path`, or the file it links to, is somewhere under `folder`."""
    folder = folder.resolve()
    locations = (path.absolute().parent.resolve() / path.name, path.resolve())
    return any(location.is_relative_to(folder) for location in locations)
