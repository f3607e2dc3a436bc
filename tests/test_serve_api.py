"""The HTTP API in-process (TestClient / ASGI): every endpoint, every error, batching, disconnects."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
from fastapi.testclient import TestClient

from prefixcap import Captioner
from prefixcap.serving import ServerConfig, create_app
from tests.helpers_serve import call_asgi, metric_samples, multipart, png, with_app
from tests.reference import assert_distinct, captions_one_by_one

MAX_PIXELS = 1_000_000
MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def captioner(image_dependent_model_dir):
    """A model whose captions depend on the image, so that answers handed to the wrong image or
    request show; the references caption each image alone (`captions_one_by_one`)."""
    return Captioner.from_pretrained(image_dependent_model_dir, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def client(captioner):
    app = create_app(captioner, ServerConfig(model_name="tiny", max_upload_mb=MAX_UPLOAD_MB, max_batch_size=8))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def photos(example_images):
    return [path.read_bytes() for path in example_images[:2]]


def texts(answer) -> list[list[str]]:
    return [[item["generated_text"] for item in entry] for entry in answer]


# ---------------------------------------------------------------------------- endpoints
def test_health(client):
    answer = client.get("/health")
    assert answer.status_code == 200
    assert answer.json() == {
        "model": "tiny", "device": "cpu", "ready": True, "max_batch_size": 8, "max_upload_mb": 1.0, "max_pixels": MAX_PIXELS,
    }  # fmt: skip


def test_multipart_captions_match_the_captioner(client, captioner, photos):
    answer = client.post("/v1/caption", files=multipart(*photos))
    assert answer.status_code == 200
    assert texts(answer.json()) == captions_one_by_one(captioner, photos)


def test_json_base64_and_data_urls_with_options(client, captioner, photos):
    encoded = [base64.b64encode(data).decode() for data in photos]
    body = {"images": [encoded[0], "data:image/jpeg;base64," + encoded[1]], "max_new_tokens": 4}
    answer = client.post("/v1/caption", json=body)
    assert answer.status_code == 200
    assert texts(answer.json()) == captions_one_by_one(captioner, photos, max_new_tokens=4)


def test_multipart_options_are_form_fields(client, captioner, photos):
    fields = {"num_beams": "3", "num_return_sequences": "2", "max_new_tokens": "5"}
    answer = client.post("/v1/caption", files=multipart(photos[0]), data=fields)
    assert answer.status_code == 200
    assert texts(answer.json()) == captioner(photos[:1], num_beams=3, num_return_sequences=2, max_new_tokens=5)


def test_several_captions_turn_on_beam_search_or_sampling(client, captioner, photos):
    images = [base64.b64encode(photo).decode() for photo in photos]
    beams = {"num_return_sequences": 3}
    answer = client.post("/v1/caption", json={"images": images, **beams})
    assert answer.status_code == 200, answer.text
    assert texts(answer.json()) == captions_one_by_one(captioner, photos, **beams)
    assert all(len(set(entry)) == 3 for entry in texts(answer.json()))  # three beams, not one caption thrice
    # a seeded sample draws from the batch's generator: the same batch gives the same captions
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "num_return_sequences": 3, "seed": 5}
    answer = client.post("/v1/caption", json={"images": images, **sampling})
    assert answer.status_code == 200, answer.text
    assert texts(answer.json()) == captioner(photos, **sampling)
    assert_distinct(texts(answer.json()))


def test_page_static_files_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file-input"' in page.text and "/static/app.js" in page.text
    assert "://" not in page.text  # nothing from a CDN: the page works offline
    assert (
        client.get("/static/app.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    )
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    docs = client.get("/docs")
    assert docs.status_code == 200 and "://" not in docs.text  # Swagger UI from local files
    assert client.get("/swagger/swagger-ui-bundle.js").status_code == 200
    body = client.get("/openapi.json").json()["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}


def test_metrics(client, photos):
    before = metric_samples(client)
    client.post("/v1/caption", files=multipart(photos[0]))
    client.post("/v1/caption", files=multipart(b"not an image"))
    after = metric_samples(client)
    delta = lambda key: after.get(key, 0) - before.get(key, 0)
    assert delta(("prefixcap_requests_total", (("status", "200"),))) == 1
    assert delta(("prefixcap_requests_total", (("status", "400"),))) == 1
    assert delta(("prefixcap_errors_total", (("kind", "invalid_image"),))) == 1
    assert delta(("prefixcap_batch_size_count", ())) == 1
    assert delta(("prefixcap_request_duration_seconds_count", ())) == 2
    assert delta(("prefixcap_images_total", ())) == 1


# ---------------------------------------------------------------------------- errors
def too_large_chunks():
    for _ in range(MAX_UPLOAD_MB * 16 + 1):
        yield b"x" * 65536


BAD_REQUESTS = {
    "declared body over the limit": (413, "too_large", {"files": multipart(b"x" * (MAX_UPLOAD_MB * 2**20 + 1))}),
    "chunked body over the limit": (
        413,
        "too_large",
        {"content": too_large_chunks(), "headers": {"content-type": "application/json"}},
    ),
    "lying content-length": (
        413,
        "too_large",
        {
            "content": b"x" * (MAX_UPLOAD_MB * 2**20 + 10),
            "headers": {"content-type": "application/json", "content-length": "10"},
        },
    ),
    "not an image": (400, "invalid_image", {"files": multipart(b"GIF89a? no, just text", names=["notes.gif"])}),
    "truncated jpeg": (
        400,
        "invalid_image",
        {"files": multipart(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", names=["cut.jpg"])},
    ),
    "too many pixels": (400, "too_many_pixels", {"files": multipart(png(1100, 1000), names=["huge.png"])}),
    "not base64": (400, "invalid_base64", {"json": {"images": ["%%% not base64 %%%"]}}),
    "malformed json": (
        400,
        "invalid_json",
        {"content": b'{"images": [', "headers": {"content-type": "application/json"}},
    ),
    "wrong content type": (
        415,
        "unsupported_media_type",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
    ),
    "no images": (422, "invalid_request", {"json": {"images": []}}),
    "text instead of a file": (
        422,
        "invalid_request",
        {"data": {"images": "cat.jpg"}, "files": [("other", ("a", b"", "text/plain"))]},
    ),
    "unknown option": (422, "invalid_options", {"json": {"images": ["AAAA"], "beams": 3}}),
    "option of the wrong type": (
        422,
        "invalid_options",
        {"files": multipart(png(8, 8)), "data": {"temperature": "warm"}},
    ),
    "option out of range": (422, "invalid_options", {"json": {"images": ["AAAA"], "top_p": 1.5}}),
    "beams and sampling": (422, "invalid_options", {"json": {"images": ["AAAA"], "num_beams": 2, "do_sample": True}}),
    "over the max_new_tokens cap": (422, "invalid_options", {"json": {"images": ["AAAA"], "max_new_tokens": 10_000}}),
    "over the num_beams cap": (422, "invalid_options", {"json": {"images": ["AAAA"], "num_beams": 64}}),
    "too many images": (422, "invalid_request", {"json": {"images": ["AAAA"] * 65}}),
}


@pytest.mark.parametrize("status, kind, request_kwargs", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_a_json_error_and_the_server_carries_on(client, photos, status, kind, request_kwargs):
    answer = client.post("/v1/caption", **request_kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["kind"] == kind and error["message"] and "\n" not in error["message"]
    assert client.post("/v1/caption", files=multipart(photos[0])).status_code == 200


def test_image_errors_name_the_file_and_the_reason(client):
    error = client.post("/v1/caption", files=multipart(png(8, 8), b"plain text", names=["ok.png", "notes.jpg"])).json()
    assert error["error"]["message"] == "images[1] (notes.jpg): not an image, or an unsupported format"
    error = client.post("/v1/caption", files=multipart(png(1100, 1000), names=["huge.png"])).json()
    assert "huge.png" in error["error"]["message"] and "too many pixels" in error["error"]["message"]


def test_a_path_in_json_is_never_read(client, example_images):
    """A string naming a real image on the server is decoded as base64 and refused."""
    for path in (str(example_images[0]), "/etc/hostname", "AAAA/etc/passwd"):
        answer = client.post("/v1/caption", json={"images": [path]})
        assert answer.status_code == 400, path
        assert answer.json()["error"]["kind"] in {"invalid_base64", "invalid_image"}


def test_unknown_routes_and_methods_use_the_same_error_shape(client):
    assert client.get("/v2/caption").json()["error"]["kind"] == "not_found"
    answer = client.get("/v1/caption")
    assert answer.status_code == 405 and answer.json()["error"]["kind"] == "method_not_allowed"
    assert "POST" in answer.headers["allow"]


def test_before_startup_health_and_captions_say_not_ready(captioner, photos):
    client = TestClient(create_app(captioner, ServerConfig(model_name="tiny")))  # no lifespan: no batcher
    assert client.get("/health").status_code == 503 and not client.get("/health").json()["ready"]
    answer = client.post("/v1/caption", files=multipart(photos[0]))
    assert answer.status_code == 503 and answer.json()["error"]["kind"] == "not_ready"


def test_a_model_failure_is_a_500_and_the_server_carries_on(captioner, photos, monkeypatch):
    app = create_app(captioner, ServerConfig(model_name="tiny"))
    with TestClient(app, raise_server_exceptions=False) as client:
        with monkeypatch.context() as patch:
            patch.setattr("prefixcap.pipeline.loop.caption_batch", lambda *a, **k: 1 / 0)
            answer = client.post("/v1/caption", files=multipart(photos[0]))
        assert answer.status_code == 500
        assert answer.json() == {"error": {"kind": "internal", "message": "internal server error; see the server log"}}
        assert client.post("/v1/caption", files=multipart(photos[0])).status_code == 200
        assert metric_samples(client)[("prefixcap_requests_total", (("status", "500"),))] == 1


# ---------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_up_to_the_limit(captioner, photos):
    app = create_app(captioner, ServerConfig(model_name="tiny", max_batch_size=4, max_wait_ms=500))

    async def scenario(client):
        answers = await asyncio.gather(*(client.post("/v1/caption", files=multipart(photos[i % 2])) for i in range(8)))
        return answers, (await client.get("/metrics")).text

    answers, metrics = asyncio.run(with_app(app, scenario))
    alone = captions_one_by_one(captioner, photos)
    assert [texts(answer.json()) for answer in answers] == [[alone[i % 2]] for i in range(8)]
    samples = metric_samples(metrics)
    batches, images = samples[("prefixcap_batch_size_count", ())], samples[("prefixcap_batch_size_sum", ())]
    assert images == 8 and batches < 8  # some batch held more than one request
    assert samples[("prefixcap_batch_size_bucket", (("le", "4.0"),))] == batches  # none over the limit


def test_an_oversized_declared_body_is_refused_unread(client):
    request = httpx.Request(
        "POST", "http://test/v1/caption", headers={"content-length": str(2**40), "content-type": "application/json"}
    )

    async def receive():
        raise AssertionError("the body was read")

    sent = asyncio.run(call_asgi(client.app, request, receive))
    assert sent[0]["status"] == 413


def test_a_client_that_disconnects_does_not_break_the_batch(captioner, photos):
    """One request hangs up right after sending its body, while another shares its batch window."""
    app = create_app(captioner, ServerConfig(model_name="tiny", max_wait_ms=300))
    request = httpx.Request("POST", "http://test/v1/caption", files=multipart(photos[0]))
    messages = [{"type": "http.request", "body": request.read(), "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def scenario(client):
        staying, sent = await asyncio.gather(
            client.post("/v1/caption", files=multipart(photos[1])), call_asgi(app, request, receive)
        )
        return staying, sent, (await client.get("/metrics")).text

    staying, sent, metrics = asyncio.run(with_app(app, scenario))
    assert texts(staying.json()) == captions_one_by_one(captioner, photos)[1:]
    assert sent[0]["status"] == 499
    samples = metric_samples(metrics)
    assert samples[("prefixcap_requests_total", (("status", "499"),))] == 1
    assert samples[("prefixcap_batch_size_sum", ())] == 1  # the abandoned image was never captioned
