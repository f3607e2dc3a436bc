"""Turn a caption request, multipart or JSON, into image bytes and checked generation options.

Images only ever come from the request body: a string is decoded as base64 and never opened
as a path or fetched as a URL, so a request cannot make the server read its own files.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from prefixcap.errors import UserError
from prefixcap.options import CaptionRequest, GenerationOptions
from prefixcap.serving.errors import APIError
from prefixcap.serving.schemas import CaptionOptions, JSONCaptionRequest, RequestOptions

if TYPE_CHECKING:
    from prefixcap.model.caption_model import CaptionModel
    from prefixcap.retrieval.inference import Retrieval

NamedImage = tuple[str, bytes]  # (how error messages name it, the file's bytes)


async def read_caption_request(request: Request, *, max_images: int) -> tuple[list[NamedImage], RequestOptions]:
    """The images and options of a request, or an APIError saying what is wrong with it."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_images)
    if content_type == "application/json":
        return await _read_json(request, max_images)
    raise APIError(
        415,
        "unsupported_media_type",
        f"expected multipart/form-data with files in 'images', or application/json "
        f'{{"images": [base64, ...]}}; got {content_type[:100] or "no Content-Type"}',
    )


class _MultiPartParser(MultiPartParser):
    """Starlette's parser, noting whether the closing boundary arrived: python-multipart takes a
    body that was cut short without complaint, and the part that was cut simply goes missing."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


async def _read_multipart(request: Request, max_images: int) -> tuple[list[NamedImage], RequestOptions]:
    async with aclosing(request.stream()) as stream:
        parser = _MultiPartParser(request.headers, stream)
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise APIError(400, "invalid_multipart", f"malformed multipart body: {error.message}") from None
    try:
        if not parser.complete:
            raise APIError(400, "invalid_multipart", "truncated multipart body: it ends before its closing boundary")
        fields = {key: value for key, value in form.multi_items() if key != "images"}
        misplaced = [key for key, value in fields.items() if isinstance(value, UploadFile)]
        if misplaced:
            raise APIError(
                422,
                "invalid_request",
                f"a file in field {misplaced[0][:100]!r}: send image files in the 'images' field",
            )
        uploads = form.getlist("images")
        _check_count(len(uploads), max_images)
        images = []
        for index, upload in enumerate(uploads):
            if not isinstance(upload, UploadFile):
                raise APIError(422, "invalid_request", f"images[{index}] is a text field; attach a file")
            name = f"images[{index}]" + (f" ({upload.filename})" if upload.filename else "")
            images.append((name, await upload.read()))
    finally:
        await form.close()
    return images, _validate(RequestOptions, fields)


async def _read_json(request: Request, max_images: int) -> tuple[list[NamedImage], RequestOptions]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, "invalid_json", f"request body is not valid JSON ({error})") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise APIError(400, "invalid_json", "request body is not valid JSON (a number with too many digits)") from None
    except RecursionError:
        raise APIError(400, "invalid_json", "request body is not valid JSON (nested too deeply)") from None
    parsed = _validate(JSONCaptionRequest, body)
    _check_count(len(parsed.images), max_images)
    images = [
        (f"images[{index}]", _decode_base64(f"images[{index}]", text)) for index, text in enumerate(parsed.images)
    ]
    return images, parsed


def _check_count(count: int, max_images: int) -> None:
    if not count:
        raise APIError(422, "invalid_request", "no images: send at least one in the 'images' field")
    if count > max_images:
        raise APIError(
            422, "invalid_request", f"{count} images is over this server's limit of {max_images} per request"
        )


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
    except ValueError:  # binascii.Error, or characters outside ASCII
        raise APIError(
            400,
            "invalid_base64",
            f"{name}: not base64-encoded image data (paths and URLs are not read; send the file itself)",
        ) from None


def caption_request(
    options: CaptionOptions,
    model: CaptionModel,
    limits: Mapping[str, int],
    *,
    rerank: str | None = None,
    retrieval: Retrieval | None = None,
) -> CaptionRequest:
    """The caption request of an HTTP request, built and checked once: its options over the
    model's defaults, checked by the model, then against the server's `limits` (upper bounds by
    option name). A reranker stays a name here: the model thread loads the one it names. With the
    server's `retrieval` (--datastore), each image's prompt is what it retrieves."""
    requested = options.model_dump(include=set(CaptionOptions.model_fields), exclude_none=True)
    try:
        request = model.request(rerank=rerank, **requested)
        if retrieval is not None:
            retrieval.check(model, request)
            request = dataclasses.replace(request, retrieval=retrieval)
    except (ValueError, UserError) as error:
        raise APIError(422, "invalid_options", str(error)) from None
    check_limits(request.generation, limits, requested)
    return request


def check_limits(options: GenerationOptions, limits: Mapping[str, int], requested: Mapping[str, Any]) -> None:
    """Raise an APIError (422) naming the first option over its limit in `limits`, and where its
    value came from when the request did not set it."""
    for name, limit in limits.items():
        value = getattr(options, name)
        if value > limit:
            if name in requested:
                origin = ""
            elif name == "num_beams" and "num_return_sequences" in requested:
                origin = f" (num_return_sequences={options.num_return_sequences} without sampling needs as many beams)"
            else:
                origin = " (the model's default)"
            raise APIError(422, "invalid_options", f"{name}={value}{origin} is over this server's limit of {limit}")
