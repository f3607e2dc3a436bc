"""Import ClipCap checkpoints (rmokady/CLIP_prefix_caption, MLP mapper) as prefixcap models."""

from __future__ import annotations

from pathlib import Path

import torch

from prefixcap.config import DEFAULT_VISION_ENCODER
from prefixcap.errors import ModelLoadError
from prefixcap.modeling import CaptionModel

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
        k.removeprefix("gpt."): v
        for k, v in state.items()
        if k.startswith("gpt.") and not k.endswith(_LEGACY_BUFFERS)
    }
    if set(mapper) != {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"} or not gpt:
        raise ModelLoadError(
            f"{checkpoint}: not a ClipCap MLP checkpoint (expected clip_project.model.{{0,2}}.* and gpt.* keys)"
        )
    return mapper, gpt


def convert_clipcap(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    vision_encoder: str = DEFAULT_VISION_ENCODER,
    decoder: str = "gpt2",
    save_frozen: bool = True,
) -> CaptionModel:
    """Build a prefixcap model from a ClipCap checkpoint; sizes come from the tensor shapes."""
    mapper_state, gpt_state = load_clipcap_state(checkpoint)
    embed_dim = mapper_state["model.0.weight"].shape[1]
    prefix_width = mapper_state["model.2.weight"].shape[0]
    hidden_size = gpt_state["transformer.wte.weight"].shape[1]
    if prefix_width % hidden_size:
        raise ModelLoadError(f"{checkpoint}: mapper output {prefix_width} is not a multiple of GPT-2 width {hidden_size}")
    model = CaptionModel.from_components(
        vision_encoder,
        decoder,
        mapper="mlp",
        prefix_length=prefix_width // hidden_size,
        stop_token=".",
        generation=dict(CLIPCAP_GENERATION),
    )
    if model.config.embed_dim != embed_dim:
        raise ModelLoadError(
            f"{checkpoint}: mapper takes {embed_dim}-d features but {vision_encoder} gives {model.config.embed_dim}-d"
        )
    model.mapper.mapper.load_state_dict(mapper_state)
    try:
        model.decoder.load_state_dict(gpt_state)
    except RuntimeError as error:
        raise ModelLoadError(f"{checkpoint}: GPT-2 weights do not fit {decoder} ({str(error).splitlines()[0]})") from None
    model.save_pretrained(out_dir, save_frozen=save_frozen)
    return model
