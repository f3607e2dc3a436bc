"""The core install (no extras) captions images, and every command that needs an extra says which
one in a single line.

A faithful core environment without a second venv or a download: a folder of links to exactly the
installed distributions that the core requirements pull in, used as the only site-packages of a
`python -S`."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

from prefixcap.system.extras import EXTRAS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def core_distributions() -> list[metadata.Distribution]:
    """The installed distributions that pyproject.toml's core dependencies need, transitively."""
    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, seen, found = [Requirement(text) for text in core], set(), []
    while todo:
        requirement = todo.pop()
        key = (requirement.name.lower().replace("_", "-"), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        distribution = metadata.distribution(requirement.name)
        found.append(distribution)
        for text in distribution.requires or []:
            needed = Requirement(text)
            extras = requirement.extras or {""}
            if needed.marker is None or any(
                needed.marker.evaluate({**default_environment(), "extra": e}) for e in extras
            ):
                todo.append(needed)
    return found


@pytest.fixture(scope="module")
def core_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a `python -S` that sees only the core's packages and prefixcap's source."""
    site = tmp_path_factory.mktemp("core-site-packages")
    for distribution in core_distributions():
        root = Path(distribution.locate_file(""))
        for top in {Path(file).parts[0] for file in distribution.files or []} - {"..", "__pycache__"}:
            if (root / top).exists() and not (site / top).exists() and not top.endswith(".pth"):
                (site / top).symlink_to(root / top)
    return {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{site}", "HF_HUB_OFFLINE": "1"}


def run_core(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_the_core_environment_lacks_every_extra(core_env) -> None:
    core = {distribution.metadata["Name"].lower() for distribution in core_distributions()}
    optional = sorted({module for extra in EXTRAS.values() for module, name in extra.items() if name not in core})
    assert "fastapi" in optional and "accelerate" in optional
    probe = "import importlib.util as u, sys; print(sorted(m for m in sys.argv[1:] if u.find_spec(m)))"
    result = run_core(core_env, "-c", probe, *optional, "torch", "transformers")
    assert result.stdout.strip() == "['torch', 'transformers']", result.stderr


def test_the_core_install_captions_images(core_env, tiny_model_dir, example_images) -> None:
    images = [str(path) for path in example_images[:2]]
    result = run_core(
        core_env, "-m", "prefixcap", "caption", "--model", str(tiny_model_dir), "--max-new-tokens", "5", *images
    )
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == images


@pytest.mark.parametrize(
    "command, extra",
    [
        (["serve", "--model", "MODEL"], "serve"),
        (["train", "features", "--out", "run"], "train"),
        (["score", "--results", "r.json", "--references", "refs.json"], "eval"),
        (["caption", "--model", "MODEL", "--format", "parquet", "--output", "OUT", "IMAGE"], "scale"),
        (["export", "onnx", "MODEL", "OUT"], "onnx"),
    ],
)
def test_commands_name_their_missing_extra(core_env, tiny_model_dir, example_images, tmp_path, command, extra) -> None:
    values = {"MODEL": str(tiny_model_dir), "OUT": str(tmp_path / "out.parquet"), "IMAGE": str(example_images[0])}
    result = run_core(core_env, "-m", "prefixcap", *[values.get(arg, arg) for arg in command])
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and f'pip install "prefixcap[{extra}]"' in result.stderr, result.stderr
