"""Turn a caption request, multipart or JSON, into image bytes and checked generation options.

Images only ever come from the request body: a string is decoded as base64 and never opened
as a path or fetched as a URL, so a request cannot make the server read its own files.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from prefixcap.generation import GenerationOptions
from prefixcap.serving.errors import APIError
from prefixcap.serving.schemas import CaptionOptions, JSONCaptionRequest

NamedImage = tuple[str, bytes]  # (how error messages name it, the file's bytes)


async def read_caption_request(request: Request, *, max_images: int) -> tuple[list[NamedImage], CaptionOptions]:
    """The images and options of a request, or an APIError saying what is wrong with it."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        images, options = await _read_multipart(request)
    elif content_type == "application/json":
        images, options = await _read_json(request)
    else:
        raise APIError(
            415,
            "unsupported_media_type",
            f"expected multipart/form-data with files in 'images', or application/json "
            f'{{"images": [base64, ...]}}; got {content_type or "no Content-Type"}',
        )
    if not images:
        raise APIError(422, "invalid_request", "no images: send at least one in the 'images' field")
    if len(images) > max_images:
        raise APIError(422, "invalid_request", f"{len(images)} images is over this server's limit of {max_images} per request")
    return images, options


async def _read_multipart(request: Request) -> tuple[list[NamedImage], CaptionOptions]:
    async with request.form() as form:
        images = []
        for index, upload in enumerate(form.getlist("images")):
            if not isinstance(upload, UploadFile):
                raise APIError(422, "invalid_request", f"images[{index}] is a text field; attach a file")
            name = f"images[{index}]" + (f" ({upload.filename})" if upload.filename else "")
            images.append((name, await upload.read()))
        fields = {key: value for key, value in form.multi_items() if key != "images"}
    return images, _validate(CaptionOptions, fields)


async def _read_json(request: Request) -> tuple[list[NamedImage], CaptionOptions]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, "invalid_json", f"request body is not valid JSON ({error})") from None
    parsed = _validate(JSONCaptionRequest, body)
    images = [(f"images[{index}]", _decode_base64(f"images[{index}]", text)) for index, text in enumerate(parsed.images)]
    return images, parsed


def _validate(model: type[CaptionOptions], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        errors = error.errors(include_url=False)
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)
        options_only = all(e["loc"] and e["loc"][0] != "images" for e in errors)
        raise APIError(422, "invalid_options" if options_only else "invalid_request", problems) from None


def _decode_base64(name: str, text: str) -> bytes:
    if text.startswith("data:"):  # a data: URL, as browsers' FileReader.readAsDataURL gives
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error:
        raise APIError(
            400, "invalid_base64", f"{name}: not base64-encoded image data (paths and URLs are not read; send the file itself)"
        ) from None


def generation_kwargs(options: CaptionOptions, defaults: Mapping[str, Any], limits: Mapping[str, int]) -> dict[str, Any]:
    """All decoding options for `generate`, the request's over the model's defaults, checked
    against GenerationOptions and against the server's `limits` (upper bounds by option name)."""
    requested = options.model_dump(include=set(CaptionOptions.model_fields), exclude_none=True)
    merged = {**defaults, **requested}
    wanted = merged.get("num_return_sequences", 1)
    if wanted > 1 and not merged.get("do_sample") and "num_beams" not in requested:
        merged["num_beams"] = max(merged.get("num_beams", 1), wanted)  # several captions need beams
    try:
        resolved = GenerationOptions.from_kwargs(merged)
    except ValueError as error:
        raise APIError(422, "invalid_options", str(error)) from None
    for name, limit in limits.items():
        if getattr(resolved, name) > limit:
            raise APIError(422, "invalid_options", f"{name}={getattr(resolved, name)} is over this server's limit of {limit}")
    return dataclasses.asdict(resolved)
