"""The option schemas: decoding options (Hugging Face `generate`'s names), caption text options, and
the request that carries both, checked once where it is made. The CLI flags, the server's request
fields and the engine's spec are generated from them."""

from prefixcap.options.generation import MIN_TEMPERATURE, GenerationOptions
from prefixcap.options.request import CaptionRequest
from prefixcap.options.text import MAX_TEXT_CHARS, TextOptions, clean_prompt, is_unicode

__all__ = [
    "MAX_TEXT_CHARS",
    "MIN_TEMPERATURE",
    "CaptionRequest",
    "GenerationOptions",
    "TextOptions",
    "clean_prompt",
    "is_unicode",
]
