"""The OpenAI API, so that tools that speak it (taggui, OneTrainer, argus-lens, the `openai`
client, `prefixcap label`) can use a prefixcap model.

POST /v1/chat/completions   one image as a `data:` URL in an `image_url` content part -> its caption(s)
GET  /v1/models             the model this server serves

A request goes the way of /v1/caption: the same decode budget, dynamic batches, option limits,
API key, Host and Origin checks and body limits (the app's middleware covers every /v1/ path).
The mapping: `max_tokens` / `max_completion_tokens` -> max_new_tokens, `n` -> num_return_sequences
(one choice per caption), `temperature` > 0 or `top_p` -> sampling, `temperature` 0 -> greedy,
`seed` -> seed; prefixcap's own options (`num_beams`, `prompt`, `prefix`, ...) may be sent as extra
fields (the `openai` client's `extra_body`). The text of the message is the prompt the decoder
continues when the model was trained with a prompt (its config's `prompt`); other models ignore
it, since instructions written for chat models mean nothing to a captioner that never saw any.
Images are only read from `data:` URLs: the server fetches nothing. Any model name is accepted
(tools often hard-code one), and answers name the served model.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefixcap.captioner import Captioner
from prefixcap.options import CaptionRequest
from prefixcap.serving.errors import APIError, ErrorBody
from prefixcap.serving.inputs import NamedImage, caption_request
from prefixcap.serving.metrics import ServerMetrics
from prefixcap.serving.schemas import CaptionOptions

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
# Caption options the request's standard OpenAI fields set; the extra fields may not set them again.
_MAPPED = {"max_new_tokens", "num_return_sequences"}
CaptionFunction = Callable[[Request, list[NamedImage], CaptionRequest], Awaitable[list[list[str]]]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat-completions request that a captioner can honour; others
    (stop, logprobs, penalties, user, ...) are accepted and ignored, prefixcap's own options used."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool | None = None


def openai_router(
    captioner: Captioner,
    limits: Mapping[str, int],
    *,
    model_name: str,
    metrics: ServerMetrics,
    ready: Callable[[], bool],
    caption: CaptionFunction,
) -> APIRouter:
    """The OpenAI routes for an app; `caption(request, images, checked)` captions through the app's
    decoder and batcher, `ready()` says whether the batcher runs."""
    router = APIRouter(tags=["OpenAI API"])

    @router.post(CHAT_PATH, summary="Caption an image (OpenAI chat completions)", responses={400: {"model": ErrorBody}})
    async def chat_completions(request: Request) -> dict[str, Any]:
        """`messages` hold one image as an `image_url` part with a `data:` URL; each choice is a caption."""
        if not ready():
            raise APIError(503, "not_ready", "the model is not ready yet; try again shortly")
        body = await _read_body(request)
        image, text = _image_and_text(body.messages)
        options = _caption_options(body, text, captioner)
        checked = caption_request(options, captioner.model, limits, retrieval=captioner.retrieval)
        captions = (await caption(request, [image], checked))[0]
        metrics.images.inc()
        return _completion(captions, model_name, captioner)

    @router.get(MODELS_PATH, summary="The served model (OpenAI models list)")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "prefixcap"}],
        }

    return router


async def _read_body(request: Request) -> ChatCompletionRequest:
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(
            415, "unsupported_media_type", f"expected application/json; got {content_type[:100] or 'no Content-Type'}"
        )
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, huge numbers
        raise APIError(400, "invalid_json", f"request body is not valid JSON ({type(error).__name__})") from None
    try:
        body = ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        raise APIError(422, "invalid_request", _problems(error)) from None
    if body.stream:
        raise APIError(422, "invalid_request", "stream: streaming is not supported; send stream: false")
    return body


def _image_and_text(messages: list[ChatMessage]) -> tuple[NamedImage, str]:
    """The one image of the user messages, and the text of the message that holds it."""
    found: list[tuple[NamedImage, str]] = []
    for index, message in enumerate(messages):
        if message.role != "user" or not isinstance(message.content, list):
            continue
        texts = [part.get("text") for part in message.content if part.get("type") == "text"]
        text = " ".join(t for t in texts if isinstance(t, str))
        for number, part in enumerate(message.content):
            if part.get("type") == "image_url":
                name = f"messages[{index}].content[{number}]"
                found.append(((name, _data_url(name, part.get("image_url"))), text))
    if len(found) != 1:
        problem = "no image" if not found else f"{len(found)} images"
        raise APIError(
            422,
            "invalid_request",
            f"{problem}: send one image per request, as a user message part "
            '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}',
        )
    return found[0]


def _data_url(name: str, image_url: Any) -> bytes:
    """The bytes of a base64 `data:` URL; anything else is refused: the server fetches no URL."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url.startswith("data:"):
        raise APIError(
            400,
            "invalid_image_url",
            f"{name}: only data: URLs are read (data:image/png;base64,...); this server fetches no URLs",
        )
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise APIError(400, "invalid_base64", f"{name}: expected a base64 data: URL (data:image/...;base64,...)")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "invalid_base64", f"{name}: the data: URL is not valid base64") from None


def _caption_options(body: ChatCompletionRequest, text: str, captioner: Captioner) -> CaptionOptions:
    extra = body.model_extra or {}
    options = {name: value for name, value in extra.items() if name in CaptionOptions.model_fields}
    if clash := sorted(_MAPPED & options.keys()):
        raise APIError(422, "invalid_options", f"{clash[0]}: set it with the OpenAI field (max_tokens, n)")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    standard = {"max_new_tokens": max_tokens, "num_return_sequences": body.n, "seed": body.seed}
    if body.temperature is not None or body.top_p is not None:
        sampling = body.temperature != 0
        standard |= {"do_sample": sampling, "temperature": body.temperature if sampling else None}
        standard |= {"top_p": body.top_p if sampling else None}
    options |= {name: value for name, value in standard.items() if value is not None and name not in options}
    if text.strip() and captioner.model.config.prompt is not None and "prompt" not in options:
        options["prompt"] = text  # a model trained with a prompt continues the client's instead
    try:
        return CaptionOptions.model_validate(options)
    except ValidationError as error:
        raise APIError(422, "invalid_options", _problems(error)) from None


def _completion(captions: list[str], model_name: str, captioner: Captioner) -> dict[str, Any]:
    tokens = sum(len(captioner.model.tokenizer.encode(text)) for text in captions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            for index, text in enumerate(captions)
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens},
    }


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors(include_url=False))[
        :1000
    ]
