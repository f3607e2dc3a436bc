"""prefixcap serve speaks the OpenAI API: the official `openai` client against a real server
process on loopback, and the request mapping and its errors in-process."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from prefixcap import Captioner
from prefixcap.pipeline import loop
from prefixcap.serving import ServerConfig, create_app
from prefixcap.testing import colour_image
from tests.helpers_serve_process import serve_in_subprocess

KEY = "pc-test-key-5d1e"


def png(name: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(colour_image(name)).save(buffer, "PNG")
    return buffer.getvalue()


def image_message(data: bytes, text: str = "Describe this image.") -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return [
        {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}
    ]


@pytest.fixture(scope="module")
def captioner(image_dependent_model_dir):
    return Captioner.from_pretrained(image_dependent_model_dir)


@pytest.fixture(scope="module")
def server(image_dependent_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {"PREFIXCAP_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    with serve_in_subprocess(image_dependent_model_dir, "--max-upload-mb", "1", log_path=log, env=env, timeout=120) as (
        _,
        url,
    ):
        yield url


def test_the_openai_client_captions_through_prefixcap_serve(server, captioner, image_dependent_model_dir):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    (model,) = [entry.id for entry in client.models.list()]
    assert model == image_dependent_model_dir.name  # a folder is named, not its path
    red, blue = png("red"), png("blue")
    expected = [captioner([data])[0][0] for data in (red, blue)]
    assert expected[0] != expected[1]  # precondition: the model tells these images apart
    for data, caption in zip((red, blue), expected):
        answer = client.chat.completions.create(model=model, messages=image_message(data))
        assert answer.choices[0].message.content == caption and answer.model == model
        assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens > 0
    two = client.chat.completions.create(model=model, messages=image_message(red), n=2, max_tokens=12)
    assert [choice.message.content for choice in two.choices] == captioner(
        [red], num_return_sequences=2, max_new_tokens=12
    )[0]
    tagged = client.chat.completions.create(model=model, messages=image_message(red), extra_body={"prefix": "sks, "})
    assert tagged.choices[0].message.content == "sks, " + expected[0]


def test_the_same_key_host_origin_and_limits_guard_the_openai_api(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="fetches no URLs"):
        client.chat.completions.create(
            model="any",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.png"}}]}
            ],
        )
    with pytest.raises(openai.UnprocessableEntityError, match="over this server's limit"):
        client.chat.completions.create(model="any", messages=image_message(png("red")), n=20)
    body = {"model": "any", "messages": image_message(png("red"))}
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server}/v1/chat/completions"
    assert httpx.post(url, json=body, headers=headers | {"Origin": "http://evil.example"}).status_code == 403
    assert httpx.post(url, json=body, headers=headers | {"Host": "evil.example"}).status_code == 400
    big = {"model": "any", "messages": image_message(b"\0" * 2_000_000)}
    assert httpx.post(url, json=big, headers=headers).status_code == 413


@pytest.fixture(scope="module")
def prompted_model_dir(image_dependent_model_dir, tmp_path_factory):
    """The same model, saved as one trained with the prompt 'a photo of'."""
    folder = tmp_path_factory.mktemp("prompted") / "model"
    shutil.copytree(image_dependent_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"prompt": "a photo of"}))
    return folder


def served_options(model_dir, body: dict) -> tuple[int, dict, list[dict]]:
    """(status, answer, the options each model batch ran with) of one in-process request."""
    captioner = Captioner.from_pretrained(model_dir)
    calls: list[dict] = []
    step = loop.caption_batch

    def recorded(model, request, **inputs):
        calls.append({**dataclasses.asdict(request.generation), **dataclasses.asdict(request.text)})
        return step(model, request, **inputs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "caption_batch", recorded)
        with TestClient(create_app(captioner, ServerConfig(model_name="m"))) as client:
            answer = client.post("/v1/chat/completions", json=body)
    return answer.status_code, answer.json(), calls


def test_the_text_is_the_prompt_only_for_models_trained_with_one(image_dependent_model_dir, prompted_model_dir):
    body = {"messages": image_message(png("red"), text="a picture of")}
    status, _, (options,) = served_options(prompted_model_dir, body)
    assert status == 200 and options["prompt"] == "a picture of"
    status, _, (options,) = served_options(image_dependent_model_dir, body)
    assert status == 200 and options["prompt"] is None  # an instruction means nothing to it


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"temperature": 0.7, "top_p": 0.9, "seed": 3},
            {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 3},
        ),
        ({"temperature": 0}, {"do_sample": False, "temperature": 1.0}),
        (
            {"max_completion_tokens": 5, "max_tokens": 9, "n": 2},
            {"max_new_tokens": 5, "num_return_sequences": 2, "num_beams": 2},
        ),
        ({"num_beams": 3, "stop": ["."], "frequency_penalty": 1}, {"num_beams": 3}),  # prefixcap's own; others ignored
    ],
)
def test_openai_fields_map_to_decoding_options(image_dependent_model_dir, body, expected):
    status, answer, (options,) = served_options(
        image_dependent_model_dir, {"messages": image_message(png("red"))} | body
    )
    assert status == 200, answer
    assert {name: options[name] for name in expected} == expected


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"messages": [{"role": "user", "content": "hello"}]}, 422, "no image"),
        ({"messages": image_message(png("red")) + image_message(png("blue"))}, 422, "2 images"),
        ({"messages": image_message(png("red")), "stream": True}, 422, "streaming is not supported"),
        ({"messages": image_message(png("red")), "num_return_sequences": 2}, 422, "set it with the OpenAI field"),
        ({"messages": image_message(png("red")), "temperature": "hot"}, 422, "temperature"),
        ({"messages": image_message(b"not an image")}, 400, "not an image"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}
                ]
            },
            400,
            "base64",
        ),
    ],
)
def test_bad_requests_are_one_line_errors(image_dependent_model_dir, body, status, message):
    answered, answer, calls = served_options(image_dependent_model_dir, body)
    assert answered == status and message in answer["error"]["message"] and not calls
