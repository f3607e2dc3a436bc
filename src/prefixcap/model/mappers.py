"""Prefix mappers: turn an image's encoding into K embeddings in the decoder's input space.

linear, mlp and transformer read the encoder's pooled embedding [B, embed_dim] (ClipCap's
designs); resampler reads its patch tokens [B, N, embed_dim] (a Perceiver resampler, as in
Flamingo, or a Q-Former without text, as in BLIP-2), so the prefix can describe where things
are and not only what the image is about overall.

Each kind is one `MAPPERS` entry: its module, whether it reads patch tokens, the config fields it
reads and the sizes it needs; a new mapper is its class and one entry (plus a CaptionConfig field
for each new size it takes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from prefixcap.errors import ModelLoadError

if TYPE_CHECKING:  # the config reads this table
    from prefixcap.model.config import CaptionConfig

# 4 GiB in float32, 30x ClipCap's MLP mapper (K=10 on GPT-2): sizes that ask for more come from a
# damaged or mistaken config.json, and would exhaust memory instead of failing.
MAX_PARAMETERS = 2**30


class LinearMapper(nn.Module):
    """The simplest mapper: a single Linear + Tanh (the linear-mapper baseline in the README)."""

    def __init__(self, embed_dim: int, hidden_size: int, prefix_length: int):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(embed_dim, hidden_size * prefix_length), nn.Tanh())

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.model(image_embeds)


class MLPMapper(nn.Module):
    """ClipCap's MLP mapper. Submodule names match ClipCap's `clip_project.model.{0,2}` keys."""

    def __init__(self, embed_dim: int, hidden_size: int, prefix_length: int):
        super().__init__()
        width = hidden_size * prefix_length
        self.model = nn.Sequential(nn.Linear(embed_dim, width // 2), nn.Tanh(), nn.Linear(width // 2, width))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.model(image_embeds)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: the embedding, expanded to `clip_length` tokens, attends
    together with K learned constant tokens; the outputs at the constant positions are the prefix."""

    def __init__(
        self, embed_dim: int, hidden_size: int, prefix_length: int, clip_length: int, num_layers: int, num_heads: int
    ):
        super().__init__()
        self.clip_length = clip_length
        self.linear = nn.Linear(embed_dim, clip_length * hidden_size)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, hidden_size))
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, dim_feedforward=2 * hidden_size, dropout=0.0,
            activation="relu", batch_first=True, norm_first=True,
        )  # fmt: skip
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        batch = image_embeds.shape[0]
        expanded = self.linear(image_embeds).view(batch, self.clip_length, -1)
        constant = self.prefix_const.unsqueeze(0).expand(batch, -1, -1)
        return self.transformer(torch.cat([expanded, constant], dim=1))[:, self.clip_length :]


class ResamplerLayer(nn.Module):
    """One pre-norm resampler block: the queries attend to [patch tokens; queries] (so they also
    see each other), then an MLP; both residual."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm_queries = nn.LayerNorm(width)
        self.norm_patches = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        normed = self.norm_queries(queries)
        context = torch.cat([self.norm_patches(patches), normed], dim=1)
        queries = queries + self.attention(normed, context, context, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class ResamplerMapper(nn.Module):
    """K learned queries cross-attend to the patch tokens through `num_layers` blocks: patch tokens
    [B, N, patch_dim] -> prefix [B, K, hidden_size], for any N (the encoder's tokens carry their
    positions already)."""

    def __init__(
        self, patch_dim: int, hidden_size: int, prefix_length: int, width: int, num_layers: int, num_heads: int
    ):
        super().__init__()
        self.input = nn.Linear(patch_dim, width)
        self.queries = nn.Parameter(torch.randn(prefix_length, width) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(width, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        patches = self.input(patches)
        queries = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, patches)
        return self.output(self.norm(queries))


class PrefixMapper(nn.Module):
    """Maps image embeddings [B, embed_dim] (patch tokens [B, N, embed_dim] for the resampler) to
    [B, prefix_length, decoder_hidden_size] prefixes."""

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.prefix_length = config.prefix_length
        self.hidden_size = config.decoder_hidden_size
        with torch.device("meta"):  # count the parameters without allocating them
            count = sum(p.numel() for p in _build(config).parameters())
        if count > MAX_PARAMETERS:
            raise ModelLoadError(
                f"the {config.mapper!r} mapper with prefix_length {config.prefix_length}, embed_dim {config.embed_dim} "
                f"and decoder_hidden_size {config.decoder_hidden_size} would have {count:,} parameters "
                f"(limit {MAX_PARAMETERS:,}); check these sizes"
            )
        self.mapper = _build(config)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        prefix = self.mapper(image_embeds)
        return prefix.reshape(image_embeds.shape[0], self.prefix_length, self.hidden_size)


@dataclass(frozen=True)
class MapperKind:
    name: str
    build: Callable[[CaptionConfig], nn.Module]  # the mapper, sized by the config
    reads_patches: bool  # patch tokens [B, N, embed_dim], not the pooled embedding [B, embed_dim]
    fields: tuple[str, ...] = ()  # the CaptionConfig sizes it reads besides embed_dim, hidden size and K
    problem: Callable[[CaptionConfig], str | None] = lambda config: None  # sizes it cannot take


def _sizes(config: CaptionConfig) -> tuple[int, int, int]:
    return config.embed_dim, config.decoder_hidden_size, config.prefix_length


def _heads_divide(
    width_name: str, width: Callable[[CaptionConfig], int], note: str = ""
) -> Callable[[CaptionConfig], str | None]:
    """The problem of attention heads that do not divide the width they split."""

    def problem(config: CaptionConfig) -> str | None:
        if width(config) % config.mapper_num_heads:
            return f"{width_name} {width(config)}{note} is not divisible by mapper_num_heads {config.mapper_num_heads}"
        return None

    return problem


MAPPERS: dict[str, MapperKind] = {
    kind.name: kind
    for kind in (
        MapperKind("linear", lambda config: LinearMapper(*_sizes(config)), reads_patches=False),
        MapperKind("mlp", lambda config: MLPMapper(*_sizes(config)), reads_patches=False),
        MapperKind(
            "transformer",
            lambda config: TransformerMapper(
                *_sizes(config), config.mapper_clip_length, config.mapper_num_layers, config.mapper_num_heads
            ),
            reads_patches=False,
            fields=("mapper_num_layers", "mapper_num_heads", "mapper_clip_length"),
            problem=_heads_divide("decoder_hidden_size", lambda config: config.decoder_hidden_size),
        ),
        MapperKind(
            "resampler",
            lambda config: ResamplerMapper(
                *_sizes(config), config.resampler_width, config.mapper_num_layers, config.mapper_num_heads
            ),
            reads_patches=True,
            fields=("mapper_num_layers", "mapper_num_heads", "mapper_width"),
            problem=_heads_divide(
                "the resampler's width",
                lambda config: config.resampler_width,
                " (mapper_width, else decoder_hidden_size)",
            ),
        ),
    )
}


def _build(config: CaptionConfig) -> nn.Module:
    return MAPPERS[config.mapper].build(config)
