"""The shapes of requests and answers, as pydantic models (they also make the /docs page)."""

from __future__ import annotations

import dataclasses
import typing

from pydantic import BaseModel, ConfigDict, Field, create_model

from prefixcap.options import GenerationOptions

_hints = typing.get_type_hints(GenerationOptions)
# One field per GenerationOptions field, same name, type and help; unset (None) = the model's default.
CaptionOptions = create_model(
    "CaptionOptions",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Decoding options, with Hugging Face `generate` names; unset ones take the model's defaults.",
    **{
        option.name: (_hints[option.name] | None, Field(None, description=option.metadata["help"]))
        for option in dataclasses.fields(GenerationOptions)
    },
)


class JSONCaptionRequest(CaptionOptions):
    images: list[str] = Field(
        min_length=1, description="image files (JPEG, PNG, ...) encoded as base64 or as data: URLs"
    )


class MultipartCaptionRequest(CaptionOptions):
    """Documents the multipart form; options are form fields next to the files."""

    images: list[bytes] = Field(min_length=1, description="image files; repeat the field for several")


class GeneratedText(BaseModel):
    generated_text: str


class Health(BaseModel):
    model: str  # the name the server was started with; for a folder, its path only to loopback clients
    device: str  # torch device the model runs on
    ready: bool  # the batcher is running and accepting work
    max_batch_size: int
    max_upload_mb: float
    max_pixels: int | None
