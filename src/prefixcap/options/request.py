"""One captioning request: what the Python API, the CLI and the server each build once, check once
(over the model's defaults, against its positions: `CaptionModel.request`), and pass on as a whole,
down to the engine. Nothing downstream re-reads loose keyword arguments or checks them again."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefixcap.options.generation import GenerationOptions
from prefixcap.options.text import TextOptions

# Scores each image's candidate captions, higher is better: (uint8 pixels [B, 3, H, W], the
# captions of each image) -> a score per caption (e.g. `prefixcap.evaluation.clipscore.CLIPScorer`).
Reranker = Callable[[Any, Sequence[Sequence[str]]], list[list[float]]]


@dataclass(frozen=True)
class CaptionRequest:
    generation: GenerationOptions  # the decoding options, the model's defaults filled in
    text: TextOptions = field(default_factory=TextOptions)  # prompt, keep_prompt, prefix, suffix
    # Orders each image's captions best first: a Reranker, or the name of one that a server loads
    # on its model thread ("clipscore"); None keeps the decoder's order.
    rerank: Reranker | str | None = None
    # Gives each image a prompt of the captions of similar images from a caption datastore: a
    # `prefixcap.retrieval.inference.Retrieval`, checked against the model where it is attached
    # (`Retrieval.check`); None: the text options' prompt.
    retrieval: Any = None
