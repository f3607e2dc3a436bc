"""`prefixcap datastore build|add`, and the retrieval benchmark's tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixcap.cli import main
from tests.test_retrieval import write_captions

pytest.importorskip("faiss")  # the retrieval extra


@pytest.fixture(scope="module")
def caption_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_captions(tmp_path_factory.mktemp("captions") / "captions.jsonl", 60)


def test_datastore_build_and_add_commands(tiny_components, caption_file, tmp_path, capsys) -> None:
    out = tmp_path / "ds"
    code = main(["datastore", "build", str(caption_file), "--out", str(out), "--encoder", str(tiny_components[0]),
                 "--index", "ivf", "--nlist", "4", "--nprobe", "1", "--split", "train", "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0 and "135 captions of 45 images (45 train)" in printed.out
    assert "IVF (4 lists, 1 searched per query)" in printed.out and "recall@10 against exact search" in printed.out
    assert "note:" not in printed.err
    assert main(["datastore", "add", str(out), str(caption_file), "--split", "val", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "the store holds 180 captions of 60 images" in printed.out and "holds val captions" in printed.err
    assert main(["datastore", "build", str(caption_file), "--out", str(out), "--encoder", str(tiny_components[0])]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_datastore_names_its_missing_extra(caption_file, tmp_path, capsys, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else find_spec(name, *a))
    assert main(["datastore", "build", str(caption_file), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "prefixcap[retrieval]"' in err
    assert not (tmp_path / "ds").exists()


def test_retrieval_benchmark_runs(tmp_path, monkeypatch) -> None:
    import runpy
    import sys

    out = tmp_path / "retrieval.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_retrieval.py"
    monkeypatch.setattr(sys, "argv", [script.name, "--captions", "3000", "--dim", "32", "--queries", "64",
                                      "--batch", "16", "--threads", "1", "--caption", "16", "--json", str(out)])  # fmt: skip
    runpy.run_path(str(script), run_name="__main__")
    results = json.loads(out.read_text())
    assert set(results["kinds"]) == {"flat", "ivf", "hnsw"}
    assert all(measured["ms_per_image_batched"] > 0 for measured in results["kinds"].values())
    assert 0 < results["kinds"]["ivf"]["recall_at_k_random_vectors"] <= 1
    assert set(results["captioning"]) == {"captions_per_s_without_retrieval", "captions_per_s_with_retrieval"}
    assert all(rate > 0 for rate in results["captioning"].values())
