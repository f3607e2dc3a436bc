"""The shapes of requests and answers, as pydantic models (they also make the /docs page)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CaptionOptions(BaseModel):
    """Decoding options, with Hugging Face `generate` names; unset ones take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    num_beams: int | None = Field(None, description="beam search with this many beams (1 = greedy)")
    do_sample: bool | None = Field(None, description="sample instead of greedy or beam search")
    temperature: float | None = Field(None, description="sampling temperature (> 0)")
    top_p: float | None = Field(None, description="sampling: nucleus probability mass, in (0, 1]")
    top_k: int | None = Field(None, description="sampling: keep the k most likely tokens (0 = all)")
    max_new_tokens: int | None = Field(None, description="longest caption, in tokens")
    num_return_sequences: int | None = Field(
        None, description="captions per image; without sampling this turns on beam search with as many beams"
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
