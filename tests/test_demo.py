"""`prefixcap demo` and the commands it prints: a model that learns, from the shell, without the hub
(every README command needed the hub, and the settings that learn lived in a test helper).

The commands run exactly as printed, from the folder the demo was made in, with HF_HUB_OFFLINE
unset and HF_ENDPOINT on a closed port: any hub access would fail them."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from prefixcap.cli import main
from tests.helpers_pipeline import subprocess_env
from tests.helpers_serve_process import serve_in_subprocess

EXACT_MATCH = re.compile(r"^exact_match_pct\s+([0-9.]+)$", re.MULTILINE)


def no_hub_env() -> dict[str, str]:
    with socket.socket() as probe:  # bound, then closed: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**subprocess_env(), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    env.pop("HF_HUB_OFFLINE")
    return env


def prefixcap(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "prefixcap", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, f"prefixcap {shlex.join(args)}:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a hang guard above the suite's 600 s: five commands, training a minute or more
def test_the_demo_learns_through_the_commands_it_prints(tmp_path: Path) -> None:
    env = no_hub_env()
    printed = prefixcap(["demo", "demo"], tmp_path, env).stdout
    lines = [shlex.split(line, comments=True) for line in printed.splitlines() if line.startswith("  ")]
    settings = [dict(word.split("=") for word in line[: line.index("prefixcap")]) for line in lines]
    commands = [line[line.index("prefixcap") :] for line in lines]
    assert [command[1] for command in commands] == ["prepare", "train", "caption", "evaluate", "serve"]
    assert settings[1] == {"OMP_NUM_THREADS": "1"} and not any(settings[:1] + settings[2:])
    assert commands[1][commands[1].index("--prefix-length") :][:2] == [
        "--prefix-length",
        "4",
    ]  # the settings that learn

    references = {
        json.loads(line)["image"]: json.loads(line)["caption"]
        for line in (tmp_path / "demo" / "data" / "captions.jsonl").read_text().splitlines()
    }
    outputs = {
        command[1]: prefixcap(command[1:], tmp_path, {**env, **setting}).stdout
        for command, setting in zip(commands[:-1], settings)
    }

    # caption: the held-out images, each captioned as its reference says (case and all)
    rows = [row.split("\t") for row in outputs["caption"].splitlines()]
    assert len(rows) == 10
    captions = {str(Path(path).relative_to(Path("demo") / "data")): caption for path, caption in rows}
    assert len(set(captions.values())) > 1  # the captions depend on the image
    assert sum(caption == references[image] for image, caption in captions.items()) >= 9

    # evaluate prints the share of held-out captions equal to their reference
    exact = float(EXACT_MATCH.search(outputs["evaluate"]).group(1))
    assert exact >= 90.0, outputs["evaluate"]
    metrics = json.loads((tmp_path / "demo" / "evaluation" / "metrics.json").read_text())
    assert metrics["num_images"] == 60 and metrics["metrics"]["exact_match_pct"] == pytest.approx(exact, abs=1e-4)

    # serve: the printed command, on a free port instead of 8000; it captions as the CLI does
    assert commands[-1] == ["prefixcap", "serve", "--model", "demo/run/best"]
    image, caption = next(iter(captions.items()))
    with serve_in_subprocess(tmp_path / "demo" / "run" / "best", log_path=tmp_path / "serve.log", env=env) as (_, url):
        files = {"images": (image, (tmp_path / "demo" / "data" / image).read_bytes())}
        answer = httpx.post(f"{url}/v1/caption", files=files, timeout=60).json()
    assert answer == [[{"generated_text": caption}]]


def test_the_demo_refuses_a_folder_that_is_not_empty(tmp_path: Path, capsys) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path}: exists and is not an empty folder; choose a new one for the demo\n"
    )
    assert [path.name for path in tmp_path.iterdir()] == ["mine.txt"]
