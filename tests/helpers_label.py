"""Shared by the label tests: a tiny random LLaVA built offline, and a loopback chat-completions
endpoint that misbehaves on purpose."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

WORDS = "a red green blue yellow black white shape on background photo of cat dog ball sky".split()


def build_tiny_vlm(out_dir: Path) -> Path:
    """A LlavaForConditionalGeneration (tiny CLIP vision tower + tiny Llama) with random weights,
    its CLIP image processor, a word-level tokenizer and a chat template: saved as a hub repo is,
    so that `hf:FOLDER` loads it through AutoProcessor / AutoModelForImageTextToText."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {token: index for index, token in enumerate([*special, "user", "assistant", ":", ".", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    backend.add_special_tokens([AddedToken(token, special=True) for token in special])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    side, patch = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=side,
        patch_size=patch,
    )
    text = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab["<image>"], vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=(side // patch) ** 2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out_dir)
    template = (
        "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>"
        "{% else %} {{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, chat_template=template, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(out_dir)  # fmt: skip
    return out_dir


class MisbehavingEndpoint:
    """A chat-completions endpoint on 127.0.0.1 that answers each image (named by the request's
    text, which `--prompt {name}` makes the image's name) by its script, then "caption of NAME".

    Scripts: a list of misbehaviours for the first requests of an image: "429" (Retry-After: 0),
    "500", "401", "slow" (answers after `slow_seconds`, past the client's timeout), "drop" (closes
    the connection without an answer); ["always", "500"] for an image that never gets an answer.
    GET /v1/models lists one model, `model`."""

    def __init__(
        self,
        scripts: dict[str, list[str]],
        *,
        slow_seconds: float = 3.0,
        answer_seconds: float = 0.0,
        model: str = "tiny-vlm",
    ):
        self.scripts, self.model = scripts, model
        self.answer_seconds = answer_seconds  # how long every answer takes
        self.slow_seconds = slow_seconds
        self.requests: Counter[str] = Counter()  # image -> requests received
        self.keys: list[str | None] = []  # the Authorization header of every request
        self.bodies: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @contextmanager
    def running(self) -> Iterator[MisbehavingEndpoint]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                endpoint.keys.append(self.headers.get("Authorization"))
                _answer(self, 200, {"object": "list", "data": [{"id": endpoint.model, "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = body["messages"][0]["content"][0]["text"]
                with endpoint.lock:
                    endpoint.keys.append(self.headers.get("Authorization"))
                    endpoint.bodies.append(body)
                    endpoint.requests[name] += 1
                    attempt = endpoint.requests[name]
                    endpoint.in_flight += 1
                    endpoint.most_in_flight = max(endpoint.most_in_flight, endpoint.in_flight)
                try:
                    script = endpoint.scripts.get(name, [])
                    if script[:1] == ["always"]:
                        action = script[1]
                    else:
                        action = script[attempt - 1] if attempt <= len(script) else "ok"
                    endpoint.act(self, action, name)
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1

        return Handler

    def act(self, handler: BaseHTTPRequestHandler, action: str, name: str) -> None:
        if action == "drop":
            handler.close_connection = True
            handler.connection.close()
            return
        time.sleep(self.slow_seconds if action == "slow" else self.answer_seconds)
        if action == "429":
            _answer(handler, 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        elif action == "500":
            _answer(handler, 500, {"error": {"message": f"the model crashed on {name}"}})
        elif action == "401":  # as careless servers do, it says which key it refused
            _answer(handler, 401, {"error": {"message": f"invalid key: {handler.headers.get('Authorization')}"}})
        else:
            _answer(
                handler,
                200,
                {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"caption of {name}"}}]},
            )


def _answer(handler: BaseHTTPRequestHandler, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    try:
        handler.send_response(status)
        for key, value in {
            "Content-Type": "application/json",
            "Content-Length": str(len(data)),
            **(headers or {}),
        }.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
        pass


def save_images(
    folder: Path, names: list[str], colour: Callable[[int], tuple[int, int, int]] | None = None
) -> list[Path]:
    """Small distinct PNGs named NAME.png in `folder`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(names):
        fill = colour(index) if colour else ((index * 53) % 256, (index * 101) % 256, (index * 197) % 256)
        Image.new("RGB", (24 + index, 20), fill).save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths
