"""Shared by the prepare and train tests: subprocess runs (single and two-process), kills, and
comparisons of feature stores and weights."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from prefixcap.data import CaptionRecord
from prefixcap.pipeline.features import FeatureStore


def subprocess_env() -> dict[str, str]:
    """One thread per process (the same numerics as the in-process runs under `one_thread`), CPU
    only, offline."""
    return {
        **os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip


def prefixcap_command(*args: str | Path, processes: int = 1) -> list[str]:
    """`python -m prefixcap ARGS`, or the same under `accelerate launch` with `processes` CPU
    processes (gloo; `--multi_gpu` is accelerate's torchrun launcher, which also serves CPUs)."""
    if processes == 1:
        return [sys.executable, "-m", "prefixcap", *map(str, args)]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    return [*launch, "-m", "prefixcap", *map(str, args)]


def run_prefixcap(*args: str | Path, processes: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        prefixcap_command(*args, processes=processes),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_when(args: list[str | Path], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start `prefixcap ARGS`, SIGKILL it as soon as `ready()`, and check it really died mid-run."""
    process = subprocess.Popen(
        prefixcap_command(*args), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"finished before it could be killed:\n{process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting to kill"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def record_steps(monkeypatch, trainer) -> list[int]:
    """The steps `trainer` executes from now on, each as the step count it starts from (filled in
    as it trains): a resumed run must start at its checkpoint's step, not retrain from 0."""
    from prefixcap.training import trainer as trainer_module

    real_step, started = trainer_module.train_step, []

    def counting(*args, **kwargs):
        started.append(trainer.progress.step)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", counting)
    return started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def synthetic_store(root: Path, vision_encoder: Path, num_images: int) -> Path:
    """root/features: a feature store of `num_images` 16-pixel synthetic images (80% train, 10% val,
    10% test) encoded by `vision_encoder`."""
    from prefixcap.data.synth import make_synthetic_dataset
    from prefixcap.pipeline.prepare import prepare_features

    captions = make_synthetic_dataset(root / "data", num_images=num_images, image_size=16)
    prepare_features(captions, root / "features", vision_encoder=vision_encoder, num_workers=0)
    return root / "features"


def store_contents(path: Path) -> tuple[list, dict[str, torch.Tensor]]:
    """Everything a reader sees in a feature store: its records and embeddings, by split."""
    store = FeatureStore(path)
    return store.records(), {split: store.embeddings(split) for split in store.manifest.splits}


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved CaptionModel's trainable parts (mapper and decoder)."""
    weights = {f"mapper.{k}": v for k, v in load_file(model_dir / "mapper.safetensors").items()}
    for path in sorted((model_dir / "decoder").glob("*.safetensors")):
        weights.update({f"decoder.{k}": v for k, v in load_file(path).items()})
    return weights


def train_synthetic_model(root: Path) -> tuple[Path, list[CaptionRecord]]:
    """`prefixcap demo ROOT`, then the prepare and train commands it prints, in this process: the
    trained model directory (greedy captions >= 90% exact on held-out images) and its 60 held-out
    (test) records. `root` must be new or empty."""
    from prefixcap.cli import main
    from prefixcap.cli.demo import demo_commands
    from prefixcap.data import load_records

    assert main(["demo", str(root)]) == 0
    (prepare, _), (train, _) = demo_commands(root)[:2]
    assert main([*prepare[1:], "--workers", "0"]) == 0
    assert main(train[1:]) == 0
    test = [record for record in load_records(root / "data" / "captions.jsonl") if record.split == "test"]
    return root / "run" / "best", test


def exact_matches(captions: list[list[str]], expected: list[str]) -> int:
    """How many images' first caption equals the expected text."""
    return sum(caption[0] == text for caption, text in zip(captions, expected, strict=True))
