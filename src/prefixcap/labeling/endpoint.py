"""A teacher behind an OpenAI-compatible chat-completions endpoint (`openai:URL#MODEL`).

Each image is one `POST URL/chat/completions` with the image as a `data:` URL and the prompt as
text, answered by `choices[0].message.content`. Requests run `concurrency` at a time, at most
`rate_limit` a minute; 429, 5xx, timeouts and dropped connections are retried with exponential
backoff (or the server's Retry-After), then the image gets a failure record. 401, 403 and 404 stop
the run: every request would fail the same way.

httpx rather than the `openai` client: retries, backoff and the rate limit are the job's own (the
client retries on its own schedule), a dry run shows the exact body sent, and httpx is one small
package. The API key comes from an environment variable only, is sent only as the Authorization
header, and is cut out of any text the endpoint sends back before that text is shown or written.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prefixcap.errors import ImageLoadError, UserError
from prefixcap.labeling.teachers import Failure, LabelItem, Outcome, TeacherOptions
from prefixcap.system.extras import require

RETRY_STATUSES = frozenset({408, 409, 425, 429})  # and every 5xx
FATAL_STATUSES = {401: "refused the API key", 403: "refused access", 404: "has no such endpoint or model"}
MAX_BACKOFF = 60.0  # seconds: the longest wait between two tries of one request
MAX_RETRY_AFTER = 600.0  # a server asking for longer than this is waited for this long
ASSUMED_SECONDS_PER_REQUEST = 2.0  # for the dry run's estimate only: a 7B VLM's caption, roughly
_MAX_MESSAGE = 300  # characters of an endpoint's error message kept in a failure record


class OpenAITeacher:
    def __init__(self, url: str, model: str | None, options: TeacherOptions, *, dry_run: bool = False):
        self.endpoint = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.options = options
        self.api_key = os.environ.get(options.api_key_env) or None
        self._stopping = threading.Event()
        self._rate = _RateLimit(options.rate_limit)
        self._client = None
        self.model = model
        if not dry_run:
            require("label", "httpx", feature="openai: teachers")
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.Client(
                headers=headers,
                timeout=httpx.Timeout(options.timeout),
                limits=httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=options.concurrency),
            )
            if self.model is None:
                self.model = self._only_model()
        self.description = f"openai:{_public_url(url)}#{self.model or '?'}"

    @classmethod
    def from_spec(cls, target: str, options: TeacherOptions, *, dry_run: bool = False) -> OpenAITeacher:
        url, _, model = target.rpartition("#") if "#" in target else (target, "", "")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--teacher openai:{_public_url(url)}: expected an http:// or https:// URL before #MODEL")
        return cls(url, model or None, options, dry_run=dry_run)

    # ------------------------------------------------------------------ what is sent

    def body(self, item: LabelItem) -> dict[str, Any]:
        """The chat-completions request for one image; raises ImageLoadError for an unreadable one."""
        image = item.load()
        side = self.options.max_image_side
        if side and max(image.size) > side:
            image.thumbnail((side, side))
        fmt = self.options.image_format
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95) if fmt == "jpeg" else image.save(buffer, "PNG")
        url = f"data:image/{fmt};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": item.instruction},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
            "temperature": self.options.temperature,
        }
        if self.options.max_new_tokens is not None:
            body["max_tokens"] = self.options.max_new_tokens
        return body

    def preview(self, item: LabelItem) -> str:
        try:
            body = self.body(item)
        except ImageLoadError as error:
            return f"(first image unreadable: {error})"
        if body["model"] is None:
            body["model"] = "(the endpoint's only model, asked with GET /models when the run starts)"
        part = body["messages"][0]["content"][1]["image_url"]
        head, _, data = part["url"].partition(",")
        part["url"] = f"{head},<{len(data) * 3 // 4:,} bytes of base64 image data>"
        auth = (
            f"Authorization: Bearer ${self.options.api_key_env}"
            if self.api_key
            else f"no API key (${self.options.api_key_env} is unset)"
        )
        return f"POST {_public_url(self.endpoint)}\n{auth}\n{json.dumps(body, indent=2, ensure_ascii=False)}"

    def estimate(self, count: int) -> str:
        options = self.options
        seconds = count * ASSUMED_SECONDS_PER_REQUEST / options.concurrency
        line = (
            f"{count:,} requests (one per image, plus retries) at --concurrency {options.concurrency}: about "
            f"{_duration(seconds)} if each takes {ASSUMED_SECONDS_PER_REQUEST:g} s (time a few with --limit 20)"
        )
        if options.rate_limit:
            line += (
                f"; --rate-limit {options.rate_limit:g}/min alone takes {_duration(count * 60 / options.rate_limit)}"
            )
        return line

    # ------------------------------------------------------------------ labelling

    def label(self, items: Iterable[LabelItem]) -> Iterator[tuple[LabelItem, Outcome]]:
        """`concurrency` threads send the requests; at most twice as many items are taken from
        `items` ahead of the answers, so a long input is read as it goes. The threads are daemons:
        an interrupted run exits at once, dropping the requests in flight."""
        tasks: queue.Queue[LabelItem | None] = queue.Queue()
        answers: queue.Queue[tuple[LabelItem, Outcome | BaseException]] = queue.Queue()

        def work() -> None:
            while (item := tasks.get()) is not None:
                try:
                    answers.put((item, self._label_one(item)))
                except BaseException as error:  # noqa: BLE001 - handed to the main thread, which raises it
                    answers.put((item, error))

        workers = [
            threading.Thread(target=work, name="prefixcap-label", daemon=True) for _ in range(self.options.concurrency)
        ]
        for worker in workers:
            worker.start()
        pending = 0
        try:
            for item in items:
                if pending >= 2 * self.options.concurrency:
                    yield _answer(answers)
                    pending -= 1
                tasks.put(item)
                pending += 1
            for _ in range(pending):
                yield _answer(answers)
        finally:
            self._stopping.set()  # retries waiting in other threads give up at once
            for _ in workers:
                tasks.put(None)

    def close(self) -> None:
        self._stopping.set()
        if self._client is not None:
            self._client.close()

    def _label_one(self, item: LabelItem) -> Outcome:
        import httpx

        try:
            content = json.dumps(self.body(item)).encode()
        except ImageLoadError as error:
            return Failure(error.reason)
        reason, attempts, delay = "", 0, 0.0
        for attempt in range(self.options.max_retries + 1):
            self._stopping.wait(delay)
            if self._stopping.is_set():
                return Failure(f"not sent: the run stopped ({reason or 'interrupted'})", attempts)
            self._rate.wait(self._stopping)
            attempts += 1
            delay = min(MAX_BACKOFF, self.options.retry_delay * 2**attempt) * random.uniform(0.75, 1.25)
            try:
                response = self._client.post(
                    self.endpoint, content=content, headers={"Content-Type": "application/json"}
                )
            except httpx.TimeoutException:
                reason = f"no answer within {self.options.timeout:g} s"
                continue
            except httpx.TransportError as error:
                reason = self._redact(f"connection failed ({type(error).__name__}: {error})".replace("\n", " "))
                continue
            status = response.status_code
            if status == 200:
                return self._caption(response, attempts)
            reason = f"HTTP {status}: {self._message(response)}"
            if status in FATAL_STATUSES:
                self._stopping.set()  # before raising, so no thread sends another request with this key
                raise UserError(f"{_public_url(self.endpoint)} {FATAL_STATUSES[status]} ({reason}); stopping")
            if status not in RETRY_STATUSES and status < 500:
                return Failure(reason, attempts)
            if (wait_for := _retry_after(response.headers.get("retry-after"))) is not None:
                delay = wait_for
        return Failure(f"{reason} (gave up after {attempts} attempts)", attempts)

    def _caption(self, response: Any, attempts: int) -> Outcome:
        try:
            content = response.json()["choices"][0]["message"]["content"]
            if isinstance(content, list):  # content parts, as some servers answer
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            if not isinstance(content, str):
                raise TypeError(type(content).__name__)
        except (ValueError, LookupError, TypeError, AttributeError):
            return Failure("the answer has no text at choices[0].message.content", attempts)
        caption = " ".join(content.split())
        return caption or Failure("the teacher answered with empty text", attempts)

    def _message(self, response: Any) -> str:
        """One line of what an error answer says: its JSON `error.message`, else its text."""
        try:
            error = response.json().get("error")
            text = error.get("message") if isinstance(error, dict) else error
        except (ValueError, AttributeError):
            text = None
        text = " ".join(str(text or response.text or response.reason_phrase).split())
        return self._redact(text[:_MAX_MESSAGE])

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "<API key>") if self.api_key else text

    def _only_model(self) -> str:
        """The endpoint's one model, for a spec without #MODEL."""
        import httpx

        models_url = self.endpoint.removesuffix("/chat/completions") + "/models"
        try:
            response = self._client.get(models_url)
            response.raise_for_status()
            names = [entry["id"] for entry in response.json()["data"]]
        except (httpx.HTTPError, ValueError, LookupError, TypeError) as error:
            reason = self._redact(" ".join(str(error).split())[:_MAX_MESSAGE])
            raise UserError(
                f"cannot list the models of {_public_url(models_url)} ({reason}); name one: openai:URL#MODEL"
            ) from None
        if len(names) != 1:
            raise UserError(
                f"{_public_url(models_url)} serves {len(names)} models ({', '.join(map(str, names[:10]))}); "
                "name one: openai:URL#MODEL"
            )
        return str(names[0])


def _answer(answers: queue.Queue) -> tuple[LabelItem, Outcome]:
    item, outcome = answers.get()
    if isinstance(outcome, BaseException):
        raise outcome
    return item, outcome


class _RateLimit:
    """Request starts spaced evenly at `per_minute` (None: no limit), across threads."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self, stopping: threading.Event) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        stopping.wait(start - now)


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks to wait (a number or an HTTP date), capped; None without one."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _public_url(url: str) -> str:
    """`url` without user:password@ or a query, which may hold credentials: safe to print and record."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
