"""Limits of `prefixcap serve`: memory held by image decodes, who may use the server, slow
clients, malformed bodies, start-up checks, numeric options, and error messages that name the
real cause."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from prefixcap import Captioner
from prefixcap.cli import build_parser
from prefixcap.cli.serve import uvicorn_config
from prefixcap.errors import ImageTooLargeError, UserError
from prefixcap.inputs.images import decode_bytes, load_image, open_image
from prefixcap.serving import ServerConfig, create_app
from prefixcap.serving.image_decoding import ImageDecoder, MemoryBudget
from prefixcap.serving.limits import HeaderTimeoutH11Protocol
from prefixcap.serving.security import default_allowed_hosts
from tests.helpers_serve import call_asgi, metric_samples, multipart, png, with_app
from tests.helpers_serve_process import serve_in_subprocess

MAX_PIXELS = 1_000_000
CAPTION = "/v1/caption"
BATCHES = ("prefixcap_batch_size_count", ())
PIL_LIMIT = f"{2 * Image.MAX_IMAGE_PIXELS:,}"  # PIL refuses images over this as it opens them


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner.from_pretrained(tiny_model_dir, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def photo(example_images) -> bytes:
    return example_images[0].read_bytes()


@contextlib.contextmanager
def serving(captioner: Captioner, **config):
    """A TestClient (lifespan included) for an app with these ServerConfig fields."""
    with TestClient(create_app(captioner, ServerConfig(model_name="tiny", **config))) as client:
        yield client


def assert_error(answer: httpx.Response, status: int, kind: str) -> str:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["kind"] == kind and error["message"] and "\n" not in error["message"]
    return error["message"]


def multipart_body(*images: bytes) -> tuple[bytes, str]:
    """(body, content type) of a multipart request with `images`."""
    request = httpx.Request("POST", "http://test/", files=multipart(*images))
    return request.read(), request.headers["content-type"]


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A tiny JPEG (a few hundred bytes) whose frame header declares width x height pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 60)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")  # SOF0: marker, length, precision, height, width
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ---------------------------------------------------------------------------- malformed bodies
def malformed_requests() -> tuple[list[tuple[str, int, str, dict]], list[tuple[str, dict]]]:
    """Hand-picked malformed bodies as (name, status, error kind, httpx request kwargs), and
    seeded random ones as (name, request kwargs)."""
    body, content_type = multipart_body(png(8, 8))
    as_json = lambda content: {"content": content, "headers": {"content-type": "application/json"}}
    picked = [
        ("deeply nested JSON", 400, "invalid_json", as_json(b"[" * 100_000 + b"]" * 100_000)),
        ("5000-digit integer", 400, "invalid_json", as_json(b'{"images": ["AAAA"], "num_beams": ' + b"9" * 5000 + b"}")),
        ("non-ASCII base64", 400, "invalid_base64", {"json": {"images": ["\u00e9t\u00e9"]}}),
        ("NaN option", 422, "invalid_options", as_json(b'{"images": ["AAAA"], "do_sample": true, "temperature": NaN}')),
        ("JSON array", 422, "invalid_request", {"json": [1, 2]}),
        ("JSON string", 422, "invalid_request", {"json": "images"}),
        ("images is a number", 422, "invalid_request", {"json": {"images": 3}}),
        ("images holds objects", 422, "invalid_request", {"json": {"images": [{"a": 1}, None]}}),
        ("options of wrong types", 422, "invalid_options",
         {"json": {"images": ["AAAA"], "num_beams": "many", "do_sample": [], "top_p": {}}}),
        ("not UTF-8", 400, "invalid_json", as_json(b'{"images": ["\xff\xfe"]}')),
        ("multipart without boundary", 400, "invalid_multipart",
         {"content": body, "headers": {"content-type": "multipart/form-data"}}),
        ("multipart cut short", 400, "invalid_multipart",
         {"content": body[: len(body) // 2], "headers": {"content-type": content_type}}),
        ("5000-digit form option", 422, "invalid_options", {"files": multipart(png(8, 8)), "data": {"num_beams": "9" * 5000}}),
    ]  # fmt: skip
    rng = random.Random(16)
    random_cases = []
    for index in range(30):
        garbage = rng.randbytes(rng.randint(1, 400))
        flipped = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        random_cases += [
            (f"random bytes as JSON {index}", as_json(garbage)),
            (f"random bytes as multipart {index}", {"content": garbage, "headers": {"content-type": content_type}}),
            (
                f"multipart with flipped bytes {index}",
                {"content": bytes(flipped), "headers": {"content-type": content_type}},
            ),
        ]
    return picked, random_cases


def test_malformed_bodies_get_a_4xx_json_error(captioner):
    picked, random_cases = malformed_requests()
    with serving(captioner) as client:
        for name, status, kind, request in picked:
            message = assert_error(client.post(CAPTION, **request), status, kind)
            assert message, name
        for name, request in random_cases:
            answer = client.post(CAPTION, **request)
            assert answer.status_code < 500, (name, answer.text)
            if answer.status_code != 200:  # a flipped byte in a file name leaves the request valid
                assert 400 <= answer.status_code < 500, name
                assert_error(answer, answer.status_code, answer.json()["error"]["kind"])
        assert client.post(CAPTION, files=multipart(png(8, 8))).status_code == 200


# ---------------------------------------------------------------------------- the real cause
def test_errors_name_the_real_cause(captioner, photo):
    body, content_type = multipart_body(photo)
    with serving(captioner) as client:
        message = assert_error(
            client.post(CAPTION, files=multipart(photo), data={"num_return_sequences": "1000"}), 422, "invalid_options"
        )
        assert message == "num_return_sequences=1000 is over this server's limit of 8"
        message = assert_error(
            client.post(CAPTION, files=[("image", ("cat.jpg", photo, "image/jpeg"))]), 422, "invalid_request"
        )
        assert message == "a file in field 'image': send image files in the 'images' field"
        cut = client.post(CAPTION, content=body[:-30], headers={"content-type": content_type})
        assert (
            assert_error(cut, 400, "invalid_multipart")
            == "truncated multipart body: it ends before its closing boundary"
        )
        bomb = client.post(CAPTION, files=multipart(png_declaring(20_000, 20_000), names=["bomb.png"]))
        assert (
            assert_error(bomb, 400, "too_many_pixels")
            == f"images[0] (bomb.png): too many pixels (over {PIL_LIMIT} > limit 1,000,000)"
        )


def test_beams_needed_for_several_captions_are_named_as_such(captioner, photo):
    with serving(captioner, max_beams=2) as client:
        answer = client.post(CAPTION, files=multipart(photo), data={"num_return_sequences": "3"})
        message = assert_error(answer, 422, "invalid_options")
    assert (
        message
        == "num_beams=3 (num_return_sequences=3 without sampling needs as many beams) is over this server's limit of 2"
    )


def test_pil_bombs_are_refused_with_the_callers_limit():
    with pytest.raises(ImageTooLargeError) as refused:
        load_image(png_declaring(20_000, 20_000), max_pixels=50_000_000, name="bomb.png")
    assert str(refused.value) == f"bomb.png: too many pixels (over {PIL_LIMIT} > limit 50,000,000)"
    with pytest.raises(ImageTooLargeError) as refused:
        open_image(png_declaring(20_000, 20_000), max_pixels=None, name="bomb.png")
    assert str(refused.value) == f"bomb.png: too many pixels (over {PIL_LIMIT} > PIL.Image.MAX_IMAGE_PIXELS)"


# ---------------------------------------------------------------------------- /health
def test_health_shows_a_model_folder_path_only_to_loopback(captioner, tiny_model_dir):
    app = create_app(captioner, ServerConfig(model_name=str(tiny_model_dir)))
    remote = TestClient(app, client=("203.0.113.9", 40000)).get("/health").json()
    local = TestClient(app, client=("127.0.0.1", 40000)).get("/health").json()
    assert remote["model"] == tiny_model_dir.name
    assert local["model"] == str(tiny_model_dir)
    hub_id = create_app(captioner, ServerConfig(model_name="someone/clipcap-model"))
    assert TestClient(hub_id, client=("203.0.113.9", 40000)).get("/health").json()["model"] == "someone/clipcap-model"


# ---------------------------------------------------------------------------- hosts, origins, key
def test_default_allowed_hosts_follow_the_bound_address():
    assert default_allowed_hosts("127.0.0.1", 8000) == ["127.0.0.1:8000", "[::1]:8000", "localhost:8000"]
    assert default_allowed_hosts("::1", 80) == ["127.0.0.1:80", "[::1]:80", "localhost:80"]
    assert default_allowed_hosts("192.0.2.7", 8000) == ["192.0.2.7:8000"]
    everywhere = default_allowed_hosts("0.0.0.0", 8000)
    assert {"localhost:8000", "0.0.0.0:8000", f"{socket.gethostname()}:8000"} <= set(everywhere)


def test_only_requests_for_this_servers_host_are_answered(captioner, photo):
    allowed = [*default_allowed_hosts("127.0.0.1", 8000), "testserver"]  # the test client's own name
    with serving(captioner, allowed_hosts=allowed) as client:
        batches = metric_samples(client).get(BATCHES, 0)
        for host in ("evil.example", "evil.example:8000", "localhost:9999", "127.0.0.1.evil.example:8000", ""):
            assert_error(client.get("/health", headers={"host": host}), 400, "host_not_allowed")
            assert_error(client.post(CAPTION, files=multipart(photo), headers={"host": host}), 400, "host_not_allowed")
        for host in ("127.0.0.1:8000", "localhost:8000", "LocalHost:8000", "[::1]:8000"):
            assert client.get("/health", headers={"host": host}).status_code == 200, host
        assert metric_samples(client).get(BATCHES, 0) == batches  # nothing refused was captioned
    with serving(captioner, allowed_hosts=default_allowed_hosts("127.0.0.1", 80)) as client:
        assert client.get("/health", headers={"host": "localhost"}).status_code == 200  # port 80 is implied
    with serving(captioner, allowed_hosts=["captions.example", "10.0.0.5:9000"]) as client:
        assert client.get("/health", headers={"host": "captions.example:1234"}).status_code == 200  # any port
        assert client.get("/health", headers={"host": "10.0.0.5:9000"}).status_code == 200
        assert client.get("/health", headers={"host": "10.0.0.5:9001"}).status_code == 400
    with serving(captioner, allowed_hosts=["*"]) as client:
        assert client.get("/health", headers={"host": "anything.example"}).status_code == 200


def test_cross_origin_posts_are_refused_unless_allowed(captioner, photo):
    with serving(captioner) as client:
        batches = metric_samples(client).get(BATCHES, 0)
        for origin in ("https://evil.example", "http://testserver.evil.example", "null"):
            answer = client.post(CAPTION, files=multipart(photo), headers={"origin": origin})
            assert_error(answer, 403, "cross_origin")
        assert metric_samples(client).get(BATCHES, 0) == batches  # refused before any captioning
        assert client.post(CAPTION, files=multipart(photo), headers={"origin": "http://testserver"}).status_code == 200
        read = client.get("/health", headers={"origin": "https://evil.example"})
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers  # unreadable there
    with serving(captioner, cors_origins=["https://app.example"]) as client:
        preflight = client.options(
            CAPTION, headers={"origin": "https://app.example", "access-control-request-method": "POST"}
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        allowed = client.post(CAPTION, files=multipart(photo), headers={"origin": "https://app.example"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert_error(
            client.post(CAPTION, files=multipart(photo), headers={"origin": "https://evil.example"}),
            403,
            "cross_origin",
        )


def test_an_api_key_guards_the_api_and_metrics(captioner, photo):
    key = "k3y-for-tests"
    with serving(captioner, api_key=key) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": key[:-1]}, {"authorization": key}):
            refused = client.post(CAPTION, files=multipart(photo), headers=headers)
            assert_error(refused, 401, "unauthorized")
            assert refused.headers["www-authenticate"] == "Bearer"
        assert_error(client.get("/metrics"), 401, "unauthorized")
        for headers in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}):
            assert client.post(CAPTION, files=multipart(photo), headers=headers).status_code == 200
            assert client.get("/metrics", headers=headers).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


# ---------------------------------------------------------------------------- slow bodies
def test_a_body_that_does_not_arrive_in_time_gets_408(captioner, photo):
    app = create_app(captioner, ServerConfig(model_name="tiny", read_timeout=0.3))
    request = httpx.Request("POST", "http://test/v1/caption", files=multipart(photo))
    messages = [{"type": "http.request", "body": request.read()[:200], "more_body": True}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the rest of the body never comes

    sent = asyncio.run(with_app(app, lambda _: call_asgi(app, request, receive)))
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["kind"] == "timeout"


# ---------------------------------------------------------------------------- start-up checks
@pytest.mark.parametrize(
    "change, reason",
    [
        ({"stop_token": "a red shape"}, "is not a single token"),
        ({"generation": {"num_beams": 50}}, "num_beams=50 (the model's default) is over this server's limit of 8"),
        ({"generation": {"max_new_tokens": 0}}, "max_new_tokens must be >= 1"),
    ],
)
def test_a_model_with_unusable_defaults_is_refused_at_start(tiny_model_dir, change, reason):
    captioner = Captioner.from_pretrained(tiny_model_dir)
    for name, value in change.items():
        setattr(captioner.model.config, name, value)
    with pytest.raises(UserError, match="cannot serve tiny: ") as refused:
        create_app(captioner, ServerConfig(model_name="tiny"))
    assert reason in str(refused.value)


def test_serve_exits_with_one_line_for_a_model_over_the_servers_limits(tiny_model_dir, tmp_path):
    model = tmp_path / "beamy"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "generation": {"num_beams": 50}}))
    command = [sys.executable, "-m", "prefixcap", "serve", "--model", str(model), "--port", "0", "--dtype", "float32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: cannot serve {model}: num_beams=50 (the model's default) is over this server's limit of 8"
    )


# ---------------------------------------------------------------------------- numeric options
@pytest.mark.parametrize(
    "option, value",
    [
        ("--port", "70000"), ("--port", "-1"), ("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"),
        ("--max-wait-ms", "inf"), ("--max-wait-ms", "1e9"), ("--max-batch-size", "0"),
        ("--max-pixels", "0"), ("--max-pixels", str(10**12)), ("--decode-memory-mb", "1"),
        ("--read-timeout", "0"), ("--read-timeout", "nan"), ("--keep-alive", "inf"), ("--max-connections", "0"),
        ("--cors-origins", "https://app.example/page"), ("--cors-origins", "app.example"), ("--allowed-hosts", ","),
        ("--api-key", ""), ("--api-key", " padded "),
    ],
)  # fmt: skip
def test_serve_refuses_bad_option_values(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_serve_defaults(monkeypatch):
    monkeypatch.delenv("PREFIXCAP_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert args.max_pixels == 50_000_000 and args.host == "127.0.0.1" and args.api_key is None
    assert (args.read_timeout, args.keep_alive, args.max_connections, args.decode_memory_mb) == (60, 5, 100, 512)
    monkeypatch.setenv("PREFIXCAP_API_KEY", "from-the-environment")
    assert build_parser().parse_args(["serve"]).api_key == "from-the-environment"


def test_time_and_connection_limits_reach_uvicorn():
    args = build_parser().parse_args(["serve", "--read-timeout", "3", "--keep-alive", "2", "--max-connections", "7"])
    config = uvicorn_config(object(), args)
    assert (config.limit_concurrency, config.timeout_keep_alive) == (7, 2)
    assert config.http.func is HeaderTimeoutH11Protocol and config.http.keywords == {"header_timeout": 3}


# ---------------------------------------------------------------------------- decode memory
def test_memory_budget_is_first_come_first_served_and_never_overdrawn():
    """Driven step by step (no sleeps, so no timing): each waiter asks in turn, then the holders
    release one at a time."""

    async def settle() -> None:  # let every task that can run reach its next wait
        for _ in range(5):
            await asyncio.sleep(0)

    async def scenario():
        budget = MemoryBudget(100)
        first = await budget.acquire(60)
        large, small, huge = (asyncio.ensure_future(budget.acquire(amount)) for amount in (80, 10, 500))
        await settle()
        assert not (large.done() or small.done() or huge.done())  # small waits its turn, though it fit beside first
        budget.release(first)
        await settle()
        assert large.result() == 80 and small.result() == 10 and not huge.done()  # both fit: 90 of 100
        budget.release(large.result())
        await settle()
        assert not huge.done() and budget.available == 90
        budget.release(small.result())
        await settle()
        assert huge.result() == 100 and budget.available == 0  # huge runs alone, within the budget
        budget.release(huge.result())
        return budget.available

    assert asyncio.run(scenario()) == 100


def test_memory_budget_survives_cancelled_waiters():
    async def scenario():
        budget = MemoryBudget(100)
        first = await budget.acquire(100)
        waiting = asyncio.ensure_future(budget.acquire(50))
        behind = asyncio.ensure_future(budget.acquire(10))
        await asyncio.sleep(0)
        waiting.cancel()  # its client went away
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        budget.release(first)
        return await behind, budget.available

    assert asyncio.run(scenario()) == (10, 90)


def test_decodes_wait_for_the_memory_budget(captioner, monkeypatch):
    """Four 1000x1000 PNGs, four threads, a budget that holds one decode: one at a time."""
    image = png(1000, 1000)
    cost = decode_bytes(open_image(image))
    running, most = 0, 0
    lock = threading.Lock()
    load_pixels = captioner.model.preprocessor.load_pixels

    def counting_load_pixels(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return load_pixels(*args, **kwargs)

    monkeypatch.setattr(captioner.model.preprocessor, "load_pixels", counting_load_pixels)

    async def scenario():
        decoder = ImageDecoder(captioner, memory_bytes=cost + cost // 2, workers=4)
        decoder.start()
        try:
            return await asyncio.gather(*(decoder.pixels(f"image {i}", image) for i in range(4)))
        finally:
            await decoder.stop()

    assert len(asyncio.run(scenario())) == 4 and most == 1


def test_large_jpegs_decode_at_reduced_scale(captioner, example_images, monkeypatch):
    """JPEGs over LARGE_JPEG_PIXELS (here lowered below a 320x213 photo) use PIL's draft mode."""
    monkeypatch.setattr("prefixcap.serving.image_decoding.LARGE_JPEG_PIXELS", 10_000)
    photo, drawn = example_images[0].read_bytes(), png(320, 213)
    preprocessor = captioner.model.preprocessor

    async def scenario():
        decoder = ImageDecoder(captioner, memory_bytes=2**30, workers=2)
        decoder.start()
        try:
            return await decoder.pixels("photo", photo), await decoder.pixels("drawn", drawn)
        finally:
            await decoder.stop()

    photo_pixels, drawn_pixels = asyncio.run(scenario())
    assert photo_pixels.equal(preprocessor.load_pixels(photo, jpeg_draft=True))
    assert not photo_pixels.equal(preprocessor.load_pixels(photo))  # the draft really changed something
    assert drawn_pixels.equal(preprocessor.load_pixels(drawn))


MODES = {  # (mode, format, save options) of images whose decode peaks decode_bytes must cover
    "RGB PNG": ("RGB", "PNG", {}), "RGBA PNG": ("RGBA", "PNG", {}), "LA PNG": ("LA", "PNG", {}),
    "P PNG with transparency": ("P", "PNG", {"transparency": 0}), "L JPEG": ("L", "JPEG", {}),
    "CMYK JPEG": ("CMYK", "JPEG", {}), "I;16 PNG": ("I;16", "PNG", {}), "F TIFF": ("F", "TIFF", {}),
}  # fmt: skip
_MEASURE = """
import sys
from prefixcap.inputs.images import load_image

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS:")
load_image(data, max_pixels=None)
print(status("VmHWM:") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak memory with Linux's /proc")
@pytest.mark.parametrize("mode, fmt, options", MODES.values(), ids=MODES.keys())
def test_decode_bytes_covers_the_decodes_peak(mode, fmt, options, tmp_path):
    """Measured in a fresh process, as the peak resident memory while a 2500x2500 image loads."""
    path = tmp_path / f"image.{fmt.lower()}"
    Image.new(mode, (2500, 2500)).save(path, fmt, **options)
    estimate = decode_bytes(open_image(path, max_pixels=None))
    measured = int(
        subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, check=True).stdout
    )
    assert estimate / 2 < measured <= estimate, (
        f"{mode}: measured {measured / 2**20:.0f} MiB, estimated {estimate / 2**20:.0f} MiB"
    )


# ---------------------------------------------------------------------------- live servers
@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir, tmp_path_factory):
    """A server with short time limits, as users start it: on loopback, with one more host name."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--read-timeout", "1", "--keep-alive", "1", "--allowed-hosts", "captions.example"]
    with serve_in_subprocess(tiny_model_dir, *args, log_path=log, env={"OMP_NUM_THREADS": "1"}, timeout=120) as (
        _,
        url,
    ):
        yield url


def test_live_server_answers_only_its_own_host_names(guarded_server):
    port = httpx.URL(guarded_server).port
    assert_error(httpx.get(f"{guarded_server}/health", headers={"host": "evil.example"}), 400, "host_not_allowed")
    assert_error(
        httpx.get(f"{guarded_server}/health", headers={"host": f"evil.example:{port}"}), 400, "host_not_allowed"
    )
    for host in (f"localhost:{port}", f"captions.example:{port}", "captions.example"):
        assert httpx.get(f"{guarded_server}/health", headers={"host": host}).status_code == 200, host
    cross = httpx.post(
        f"{guarded_server}{CAPTION}", files=multipart(png(8, 8)), headers={"origin": "https://evil.example"}
    )
    assert_error(cross, 403, "cross_origin")


def test_slow_clients_are_cut_off(guarded_server):
    """Against a 1 s read timeout: clients that send nothing, that send a header byte every 0.2 s
    for as long as they are let, and that send their body, or go on after a 413, a byte every 0.2 s
    for 0.6 s and then nothing (a byte sent after the server closed would be answered with a
    reset, which drops the unread rest of the answer). Each one is disconnected; the body ones
    after a 408."""
    url = httpx.URL(guarded_server)
    address = (url.host, url.port)
    request_line = f"POST {CAPTION} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n".encode()
    body_headers = request_line + b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    too_large = request_line + b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    kinds = (("silent", b"", 2), ("headers", request_line, 4), ("body", body_headers, 3), ("refused", too_large, 2))
    clients = {}
    for kind, opening, count in kinds:
        for index in range(count):
            connection = socket.create_connection(address)
            connection.sendall(opening)
            connection.setblocking(False)
            clients[f"{kind} {index}"] = (connection, bytearray())
    closed: dict[str, bytes] = {}
    start = time.monotonic()
    while len(closed) < len(clients) and time.monotonic() < start + 30:  # ample, on a busy machine too
        time.sleep(0.2)
        for name, (connection, answer) in clients.items():
            if name in closed:
                continue
            sending = name.startswith("headers") or (not name.startswith("silent") and time.monotonic() < start + 0.6)
            try:
                data = connection.recv(65536)
            except BlockingIOError:
                with contextlib.suppress(OSError):
                    if sending:
                        connection.send(b"x")
                continue
            except OSError:  # reset: closed by the server
                data = b""
            answer += data
            if not data:
                closed[name] = bytes(answer)
    for connection, _ in clients.values():
        connection.close()
    assert sorted(closed) == sorted(clients), f"still open: {sorted(set(clients) - set(closed))}"
    for name, answer in closed.items():
        if name.startswith("body"):
            assert answer.startswith(b"HTTP/1.1 408 "), (name, answer[:200])
            assert b'"kind":"timeout"' in answer
        elif name.startswith("refused"):
            assert answer.startswith(b"HTTP/1.1 413 "), (name, answer[:200])
    assert httpx.get(f"{guarded_server}/health").status_code == 200  # the server carries on


@pytest.mark.slow
def test_large_images_hold_bounded_memory(tiny_model_dir, tmp_path):
    """16 clients x 2 requests of an 8000x8000 PNG (about 0.3 GB to decode each), then 12 x 2 of
    a tiny JPEG that declares 7999x7999 (libjpeg fills in the missing rows): every request is
    answered, and the server's resident memory peaks less than 1 GiB above where it started."""
    large_png = io.BytesIO()
    Image.new("RGB", (8000, 8000), (30, 120, 200)).save(large_png, "PNG")
    scenarios = [(16, "large.png", large_png.getvalue(), 200), (12, "declared.jpg", jpeg_declaring(7999, 7999), 200)]
    args = ["--max-pixels", "64000000", "--max-wait-ms", "10"]
    log = tmp_path / "serve.log"
    with serve_in_subprocess(tiny_model_dir, *args, log_path=log, env={"OMP_NUM_THREADS": "1"}, timeout=120) as (
        process,
        url,
    ):
        server = psutil.Process(process.pid)
        httpx.post(f"{url}{CAPTION}", files=multipart(png(64, 64)), timeout=60)  # warm-up
        start = peak = server.memory_info().rss
        sampling = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not sampling.wait(0.01):
                peak = max(peak, server.memory_info().rss)

        async def clients(count: int, name: str, data: bytes) -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=count)) as http:

                async def client() -> list[int]:
                    return [
                        (await http.post(CAPTION, files=multipart(data, names=[name]))).status_code for _ in range(2)
                    ]

                return [
                    status
                    for statuses in await asyncio.gather(*(client() for _ in range(count)))
                    for status in statuses
                ]

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            statuses = {name: asyncio.run(clients(count, name, data)) for count, name, data, _ in scenarios}
        finally:
            sampling.set()
            sampler.join()
    for count, name, _, status in scenarios:
        assert statuses[name] == [status] * count * 2, name
    growth = (peak - start) / 2**30
    print(f"\nserver RSS peak growth: {growth * 1024:.0f} MiB")
    assert growth <= 1.0
