"""The README's recipe table: size, trainable size, feature-store size and training memory of
encoder + mapper + decoder combinations, from the published configs (no weights are downloaded).

- Parameter counts: the real transformers classes and prefixcap's mapper, built on the meta
  device from each checkpoint's config (exact; LoRA counts come from PEFT's injected layers).
- Feature store per 100k images: float16 pooled embeddings or patch tokens, as `prepare` writes.
- Training memory at batch 64 (computed, partly measured): float32 weights of mapper and decoder
  (Accelerate's bf16 autocast keeps float32 masters), float32 gradients and AdamW's two moments
  for the trainable parameters, plus activations. Activations are *measured*: the tensors autograd
  saves for backward, counted with `torch.autograd.graph.saved_tensors_hooks` in a real bf16-autocast
  training forward at full width and batch 64 (K prefix + 20 caption tokens), once with one decoder
  block and once with two; the difference is one block's share, extrapolated to the full depth.
  Not counted: allocator fragmentation and CUDA context (add ~1-2 GB), the frozen image encoder
  (it runs once, in `prepare`, not during training).

    python benchmarks/recipes.py            # prints the markdown table (a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from prefixcap.model.config import CaptionConfig
from prefixcap.model.lora import add_lora
from prefixcap.model.mappers import PrefixMapper
from prefixcap.training.objective import CaptionLoss

BATCH = 64
CAPTION_TOKENS = 20
STORE_IMAGES = 100_000

# Published configs, as on the hub (only the fields that set sizes).
ENCODERS: dict[str, dict[str, Any]] = {
    "CLIP ViT-B/32": dict(
        model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, patch_size=32, image_size=224, projection_dim=512,
    ),
    "CLIP ViT-L/14": dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768,
    ),
    "SigLIP 2 B/16-224": dict(
        model_type="siglip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, patch_size=16, image_size=224,
    ),
}  # fmt: skip
DECODERS: dict[str, dict[str, Any]] = {
    "GPT-2 124M": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "SmolLM2-360M": dict(
        model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    "Qwen2.5-0.5B": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
    ),
}  # fmt: skip


@dataclass
class Recipe:
    encoder: str
    mapper: str  # a CaptionConfig mapper kind
    decoder: str
    freeze: str  # none | frozen | lora
    prefix_length: int = 10
    lora_rank: int = 16
    mapper_options: dict[str, Any] = field(default_factory=dict)  # CaptionConfig mapper sizes
    note: str = ""

    @property
    def uses_patches(self) -> bool:
        return CaptionConfig(mapper=self.mapper).uses_patches


RECIPES = [
    Recipe("CLIP ViT-B/32", "mlp", "GPT-2 124M", "none", note=" (ClipCap)"),
    Recipe("CLIP ViT-B/32", "transformer", "GPT-2 124M", "frozen"),
    Recipe("CLIP ViT-L/14", "resampler", "SmolLM2-360M", "lora", prefix_length=32, mapper_options={"mapper_num_layers": 4}),
    Recipe("SigLIP 2 B/16-224", "resampler", "Qwen2.5-0.5B", "lora", prefix_length=32, mapper_options={"mapper_num_layers": 4}),
]  # fmt: skip


def hf_config(values: dict[str, Any], **overrides: Any):
    values = {**values, **overrides}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def encoder_sizes(name: str) -> tuple[int, int, int]:
    """(pooled width, patch width, patch tokens) of an encoder config."""
    values = ENCODERS[name]
    pooled = values.get("projection_dim", values["hidden_size"])
    return pooled, values["hidden_size"], (values["image_size"] // values["patch_size"]) ** 2


def count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def build_parts(recipe: Recipe, layers: int | None = None) -> tuple[nn.Module, PrefixMapper, CaptionConfig]:
    """The decoder (all blocks, or the first `layers`) and the mapper, with the recipe's freezing."""
    values = DECODERS[recipe.decoder]
    depth_key = "n_layer" if values["model_type"] == "gpt2" else "num_hidden_layers"
    config = hf_config(values, **({depth_key: layers} if layers else {}))
    decoder = AutoModelForCausalLM.from_config(config)
    pooled, patch, _ = encoder_sizes(recipe.encoder)
    caption_config = CaptionConfig(
        mapper=recipe.mapper, prefix_length=recipe.prefix_length, embed_dim=patch if recipe.uses_patches else pooled,
        decoder_hidden_size=decoder.get_input_embeddings().embedding_dim, **recipe.mapper_options,
    )  # fmt: skip
    if recipe.freeze == "frozen":
        decoder.requires_grad_(False)
    elif recipe.freeze == "lora":
        add_lora(decoder, recipe.lora_rank, 2 * recipe.lora_rank)
    return decoder, PrefixMapper(caption_config), caption_config


class _Stand(nn.Module):
    """What CaptionLoss reads of a CaptionModel, without an image encoder or tokenizer."""

    def __init__(self, decoder: nn.Module, mapper: PrefixMapper, config: CaptionConfig):
        super().__init__()
        self.decoder, self.mapper, self.config = decoder, mapper, config

    def embed_inputs(self, input_ids: torch.Tensor, *, image_embeds: torch.Tensor) -> torch.Tensor:
        prefix = self.mapper(image_embeds)
        return torch.cat([prefix, self.decoder.get_input_embeddings()(input_ids)], dim=1)


def saved_activation_bytes(recipe: Recipe, layers: int) -> int:
    """Bytes autograd saves in one bf16-autocast training forward, batch 64, `layers` blocks."""
    decoder, mapper, config = build_parts(recipe, layers)
    loss = CaptionLoss(_Stand(decoder, mapper, config))
    parameters = {p.untyped_storage().data_ptr() for p in loss.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    _, patch, tokens = encoder_sizes(recipe.encoder)
    embeds = torch.randn(BATCH, tokens, patch) if recipe.uses_patches else torch.randn(BATCH, config.embed_dim)
    vocab = decoder.get_input_embeddings().num_embeddings
    input_ids = torch.randint(0, vocab, (BATCH, CAPTION_TOKENS))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss(image_embeds=embeds, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
    return sum(seen.values())


def describe(recipe: Recipe) -> dict[str, Any]:
    with torch.device("meta"):
        decoder, mapper, _ = build_parts(recipe)
        values = dict(ENCODERS[recipe.encoder])
        encoder = AutoModel.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    trainable = count(mapper, True) + count(decoder, True)
    trained_module_params = count(mapper) + count(decoder)
    one, two = saved_activation_bytes(recipe, 1), saved_activation_bytes(recipe, 2)
    depth = decoder.config.num_hidden_layers
    activations = one + (two - one) * (depth - 1)
    pooled, patch, tokens = encoder_sizes(recipe.encoder)
    store = STORE_IMAGES * (tokens * patch if recipe.uses_patches else pooled) * 2
    memory = 4 * trained_module_params + (4 + 8) * trainable + activations
    return {
        "recipe": recipe,
        "params": count(encoder) + trained_module_params,
        "trainable": trainable,
        "store": store,
        "activations": activations,
        "memory": memory,
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.manual_seed(0)
    print(
        f"| encoder + mapper + decoder | training | parameters | trainable | feature store per {STORE_IMAGES // 1000}k "
        f"images | training memory, batch {BATCH} (activations) |"
    )
    print("|---|---|---|---|---|---|")
    for row in map(describe, RECIPES):
        recipe = row["recipe"]
        training = {"none": "full fine-tune", "frozen": "mapper only", "lora": f"LoRA r={recipe.lora_rank}"}
        layers = recipe.mapper_options.get("mapper_num_layers")
        mapper = f"{recipe.mapper} (K={recipe.prefix_length}{f', {layers} layers' if layers else ''})"
        print(
            f"| {recipe.encoder} + {mapper} + {recipe.decoder}{recipe.note} | {training[recipe.freeze]} | {row['params'] / 1e6:,.0f}M "
            f"| {row['trainable'] / 1e6:,.1f}M | {row['store'] / 1e9:,.2f} GB "
            f"| {row['memory'] / 2**30:,.1f} GiB ({row['activations'] / 2**30:,.1f}) |"
        )


if __name__ == "__main__":
    main()
