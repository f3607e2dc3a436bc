"""The shapes of requests and answers, as pydantic models (they also make the /docs page)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from prefixcap.options import GenerationOptions, TextOptions

# One field per GenerationOptions and TextOptions field, same name, type and help; unset (None) =
# the model's (or TextOptions') default.
CaptionOptions = create_model(
    "CaptionOptions",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Decoding options, with Hugging Face `generate` names, and the caption text options (prompt, "
    "keep_prompt, prefix, suffix); unset ones take the model's defaults.",
    **{
        option.name: (hints[option.name] | None, Field(None, description=option.metadata["help"]))
        for schema, hints in ((schema, typing.get_type_hints(schema)) for schema in (GenerationOptions, TextOptions))
        for option in dataclasses.fields(schema)
    },
)


RERANK_HELP = (
    "'clipscore': score each image's captions with CLIPScore (the server's --rerank-clip, or the model's "
    "own CLIP) and return them best first, each with its score; useful with num_return_sequences > 1"
)


class RerankOption(BaseModel):
    """Not a decoding option: it orders what decoding produced, so it stays out of CaptionOptions."""

    rerank: Literal["clipscore"] | None = Field(None, description=RERANK_HELP)


class RetrievalOption(BaseModel):
    """Not a decoding option either: what a server started with --datastore returns besides captions."""

    show_retrieved: bool | None = Field(
        None,
        description="with a server started with --datastore: each caption also lists the datastore captions "
        "its image retrieved for its prompt, with their cosine scores, best first",
    )


class RequestOptions(CaptionOptions, RerankOption, RetrievalOption):
    """Everything a request may set besides its images (a multipart request's form fields)."""


class JSONCaptionRequest(RequestOptions):
    images: list[str] = Field(
        min_length=1, description="image files (JPEG, PNG, ...) encoded as base64 or as data: URLs"
    )


class MultipartCaptionRequest(RequestOptions):
    """Documents the multipart form; options are form fields next to the files."""

    images: list[bytes] = Field(min_length=1, description="image files; repeat the field for several")


class RetrievedCaption(BaseModel):
    caption: str
    score: float  # cosine between the image's and the caption's CLIP embeddings


class GeneratedText(BaseModel):
    generated_text: str
    score: float | None = None  # its reranking score, only when the request asked for `rerank`
    # its image's retrieved captions, only when the request asked for `show_retrieved`
    retrieved: list[RetrievedCaption] | None = None


class Health(BaseModel):
    model: str  # the name the server was started with; for a folder, its path only to loopback clients
    device: str  # torch device the model runs on
    ready: bool  # the batcher is running and accepting work
    max_batch_size: int
    max_upload_mb: float
    max_pixels: int | None
