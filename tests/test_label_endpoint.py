"""`prefixcap label` against OpenAI-compatible endpoints that misbehave on purpose, on loopback:
retries, failure records, nothing lost, and the API key never shown."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from prefixcap.labeling import endpoint as endpoint_module
from tests.helpers_label import MisbehavingEndpoint, save_images
from tests.helpers_pipeline import kill_when, prefixcap_command, subprocess_env

KEY = "sk-test-9f2c4e7a-never-show-me"


def label(images: Path, out: Path, spec: str, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    """`prefixcap label` in a child process, as users run it, with the key in its environment."""
    command = prefixcap_command("label", images, "--teacher", spec, "--out", out, "--prompt", "{name}", *args)
    env = subprocess_env() | ({"OPENAI_API_KEY": key} if key else {})
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def labelled(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len({row["image"] for row in rows}), "an image was labelled twice"
    return {Path(row["image"]).stem: row["caption"] for row in rows}


def test_retries_then_failure_records_nothing_lost_and_the_key_never_shows(tmp_path):
    names = ["plain", "other", "limited", "flaky", "slow", "dropped", "broken"]
    images, out = tmp_path / "images", tmp_path / "labels.jsonl"
    save_images(images, names)
    scripts = {
        "limited": ["429", "429"], "flaky": ["500", "500"], "slow": ["slow"], "dropped": ["drop"],
        "broken": ["always", "500"],
    }  # fmt: skip
    server = MisbehavingEndpoint(scripts, slow_seconds=3.0)
    with server.running():
        result = label(images, out, f"openai:{server.url}#tiny-vlm", "--concurrency", "3", "--timeout", "1",
                       "--max-retries", "3", "--retry-delay", "0.01")  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert labelled(out) == {name: f"caption of {name}" for name in names if name != "broken"}
    assert server.requests == {"plain": 1, "other": 1, "limited": 3, "flaky": 3, "slow": 2, "dropped": 2, "broken": 4}
    assert set(server.keys) == {f"Bearer {KEY}"} and server.most_in_flight <= 3
    (failure,) = [json.loads(line) for line in (tmp_path / "labels.failures.jsonl").read_text().splitlines()]
    assert Path(failure["image"]).stem == "broken" and failure["attempts"] == 4
    assert failure["error"] == "HTTP 500: the model crashed on broken (gave up after 4 attempts)"
    assert f"error: {images / 'broken.png'}: HTTP 500" in result.stderr
    assert "6 labelled, 0 skipped (labelled before), 1 failed" in result.stderr
    written = [path.read_text() for path in tmp_path.glob("*.jsonl")]
    assert all(KEY not in text for text in [result.stdout, result.stderr, *written])

    # the endpoint recovers: a rerun asks only about the failed image (the model found by GET /models)
    repaired = MisbehavingEndpoint({})
    with repaired.running():
        result = label(images, out, f"openai:{repaired.url}")
    assert result.returncode == 0, result.stderr
    assert repaired.requests == {"broken": 1} and repaired.bodies[0]["model"] == "tiny-vlm"
    assert labelled(out) == {name: f"caption of {name}" for name in names}
    assert not (tmp_path / "labels.failures.jsonl").exists()
    assert KEY not in result.stdout + result.stderr + out.read_text()


def test_a_refused_key_stops_the_run_without_showing_the_key(tmp_path):
    images, out = tmp_path / "images", tmp_path / "labels.jsonl"
    save_images(images, ["one", "two"])
    server = MisbehavingEndpoint({"one": ["always", "401"], "two": ["always", "401"]})
    with server.running():
        result = label(images, out, f"openai:{server.url}#tiny-vlm", "--concurrency", "1")
    assert result.returncode == 2
    assert "refused the API key (HTTP 401: invalid key: Bearer <API key>); stopping" in result.stderr
    assert sum(server.requests.values()) == 1  # the first refusal stops the run
    assert KEY not in result.stdout + result.stderr + "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))


def test_a_killed_run_loses_only_the_requests_in_flight(tmp_path):
    names = [f"image{index}" for index in range(12)]
    images, out = tmp_path / "images", tmp_path / "labels.jsonl"
    save_images(images, names)
    server = MisbehavingEndpoint({}, answer_seconds=0.2)
    args = ["label", images, "--teacher", f"openai:{server.url}#tiny-vlm", "--out", out, "--prompt", "{name}",
            "--concurrency", "2"]  # fmt: skip
    with server.running():
        kill_when(args, lambda: out.exists() and out.read_text().count("\n") >= 4)
        kept = labelled(out)  # every line whole, the killed run's labels kept
        assert 4 <= len(kept) < len(names)
        sent_before = sum(server.requests.values())
        assert sent_before <= len(kept) + 2  # at most --concurrency requests were in flight at the kill
        result = label(images, out, f"openai:{server.url}#tiny-vlm", "--concurrency", "2", key=None)
    assert result.returncode == 0, result.stderr
    assert labelled(out) == {name: f"caption of {name}" for name in names}
    assert sum(server.requests.values()) <= len(names) + 2  # the rerun asked only about the rest


def test_rate_limit_spaces_request_starts_across_threads(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(endpoint_module.time, "monotonic", lambda: clock[0])
    waits: list[float] = []

    class Event:
        def wait(self, seconds: float) -> None:
            waits.append(seconds)

    limit = endpoint_module._RateLimit(per_minute=120)  # one every 0.5 s
    for _ in range(3):
        limit.wait(Event())
    clock[0] += 2.0  # idle for a while: the next request goes at once, the one after waits again
    limit.wait(Event())
    limit.wait(Event())
    assert waits == [0.0, 0.5, 1.0, 0.0, 0.5]
    endpoint_module._RateLimit(None).wait(threading.Event())  # no limit: no wait


@pytest.mark.parametrize(
    ("header", "seconds"), [("3", 3.0), ("0", 0.0), ("-5", 0.0), ("99999", 600.0), ("soon", None), (None, None)]
)
def test_retry_after_header(header, seconds):
    assert endpoint_module._retry_after(header) == seconds
