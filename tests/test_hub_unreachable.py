"""An unreachable hub is one line from every command, with no retry storm; cached models still load
(without HF_HUB_OFFLINE, `prepare` retried for 1 min 52 s with 20 retry lines and ended
with transformers' "local directory with the same name" text).

Each command runs as a user runs it, in a subprocess with HF_HUB_OFFLINE unset, HF_ENDPOINT on a
closed loopback port and an empty cache. The subprocess timeout is only a guard against a hang."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_pipeline import subprocess_env, synthetic_store
from tests.reference import make_clipcap_checkpoint

HANG_GUARD_S = 120  # far above a few seconds of start-up: only catches a command that hangs or retries for minutes
HUB_MODEL = "someone/prefixcap-model"


@pytest.fixture(scope="module")
def closed_port() -> int:
    with socket.socket() as probe:  # bound, then closed: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_unreachable(args: list[str], port: int, home: Path) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(home)}
    env.pop("HF_HUB_OFFLINE")
    env.pop("PREFIXCAP_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "prefixcap", *args], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )


@pytest.fixture(scope="module")
def workspace(tiny_components, tmp_path_factory) -> dict[str, Path]:
    """A feature store and its synthetic images (encoded by the tiny local CLIP), a COCO results
    file for them, a local model and a ClipCap checkpoint."""
    from prefixcap import CaptionModel

    root = tmp_path_factory.mktemp("hub")
    clip_dir, gpt2_dir = tiny_components
    store = synthetic_store(root, clip_dir, num_images=20)
    records = [json.loads(line) for line in (root / "data" / "captions.jsonl").read_text().splitlines()]
    results = [{"image_id": r["image"], "caption": "a shape"} for r in records if r["split"] == "test"]
    (root / "results.json").write_text(json.dumps(results))
    CaptionModel.from_components(clip_dir, gpt2_dir, prefix_length=2).save_pretrained(root / "model")
    make_clipcap_checkpoint(gpt2_dir, root / "ckpt.pt")
    return {"root": root, "store": store, "data": root / "data" / "captions.jsonl", "model": root / "model"}


def commands(w: dict[str, Path]) -> dict[str, list[str]]:
    """Every command, each naming a hub model it must load first (evaluate, serve and export take a
    hub repo id as --model, as caption does)."""
    root, image = w["root"], str(next((w["root"] / "data" / "images").iterdir()))
    clip = ["openai/clip-vit-base-patch32"]
    return {
        "caption registered name": ["caption", image, "--model", "clipcap-coco"],
        "prepare": ["prepare", str(w["data"]), "--out", str(root / "f2"), "--vision-encoder", *clip, "--workers", "0"],
        "train": ["train", str(w["store"]), "--decoder", "gpt2", "--out", str(root / "run")],
        "evaluate": ["evaluate", "--model", HUB_MODEL, "--data", str(w["store"]), "--out", str(root / "e1")],
        "evaluate bertscore": [
            "evaluate",
            "--model",
            str(w["model"]),
            "--data",
            str(w["store"]),
            "--metrics",
            "bertscore",
            "--out",
            str(root / "e2"),
        ],  # fmt: skip
        "score clipscore": [
            "score",
            "--results",
            str(root / "results.json"),
            "--references",
            str(w["data"]),
            "--metrics",
            "clipscore",
            "--clip-model",
            *clip,
            "--out",
            str(root / "s"),
        ],  # fmt: skip
        "serve": ["serve", "--model", HUB_MODEL, "--port", "0"],
        "export": ["export", "onnx", HUB_MODEL, str(root / "onnx")],
        "convert-clipcap": ["convert-clipcap", str(root / "ckpt.pt"), str(root / "converted")],
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["caption registered name", "prepare", "train", "evaluate", "evaluate bertscore",
     "score clipscore", "serve", "export", "convert-clipcap"],
)  # fmt: skip
def test_every_command_fails_in_one_line_without_retrying(name, workspace, closed_port, tmp_path) -> None:
    result = run_unreachable(commands(workspace)[name], closed_port, tmp_path / "hf-home")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Retry" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: ") and f"the hub at http://127.0.0.1:{closed_port} cannot be reached" in error, (
        result.stderr
    )
    assert "local directory with the same name" not in error
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [error]


@pytest.mark.slow
def test_a_cached_hub_model_still_loads_when_the_hub_is_unreachable(workspace, tiny_components, closed_port, tmp_path):
    """Offline at once, but not worse off: a hub id whose files are cached loads from the cache."""
    home = tmp_path / "hf-home"
    cached = home / "hub" / "models--someone--tiny-clip"
    commit = "0" * 40
    shutil.copytree(tiny_components[0], cached / "snapshots" / commit)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)
    args = ["prepare", str(workspace["data"]), "--out", str(tmp_path / "features"), "--workers", "0"]
    result = run_unreachable([*args, "--vision-encoder", "someone/tiny-clip"], closed_port, home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Retry" not in result.stderr
    assert (tmp_path / "features" / "store.json").is_file()
