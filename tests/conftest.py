"""Shared fixtures: tiny real models built locally, so no test touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch
import transformers

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

EXAMPLE_IMAGES = sorted((Path(__file__).parents[1] / "examples" / "images").glob("*.jpg"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Single-threaded torch, as in the subprocesses, so that in-process results match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(clip_dir, gpt2_dir): a tiny CLIPModel + image processor, a tiny GPT-2 + BPE tokenizer."""
    from prefixcap.testing import build_components

    return build_components(tmp_path_factory.mktemp("components"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_components: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved, untrained CaptionModel directory (MLP mapper, K=4)."""
    from prefixcap import CaptionModel

    torch.manual_seed(0)
    model = CaptionModel.from_components(*tiny_components, mapper="mlp", prefix_length=4)
    directory = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    return EXAMPLE_IMAGES


@pytest.fixture(scope="session")
def image_dependent_model_dir(tiny_components: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model taught to caption each plain colour with its own sentence, so that its
    captions depend on the image (`prefixcap.testing.build_image_dependent_model`)."""
    from prefixcap.testing import build_image_dependent_model

    return build_image_dependent_model(tmp_path_factory.mktemp("model") / "colours", components=tiny_components)


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """The demo's model, trained once per session on one thread (`helpers_pipeline.train_synthetic_model`):
    its directory (>= 90% exact on held-out images) and its held-out records. Read it, never write into it."""
    from tests.helpers_pipeline import train_synthetic_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_synthetic_model(tmp_path_factory.mktemp("synthetic"))
    finally:
        torch.set_num_threads(threads)
