"""The benchmark scripts still run against the library: every one parses its options, and the
fast ones complete a tiny run and write their JSON (figures are not checked: speed is the
benchmarks' business, not the tests')."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(BENCHMARKS / name), run_name="__main__")


@pytest.mark.parametrize("name", sorted(path.name for path in BENCHMARKS.glob("bench_*.py")))
def test_every_benchmark_parses_its_options(name, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_benchmark(name, "--help", monkeypatch=monkeypatch)
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_preprocessing_benchmark_runs(tmp_path, monkeypatch):
    out = tmp_path / "preprocess.json"
    run_benchmark("bench_preprocess.py", "--images", "4", "--threads", "1", "--json", str(out), monkeypatch=monkeypatch)
    results = json.loads(out.read_text())
    assert set(results) >= {"a_hf_processor", "b_prefixcap_uint8", "c_prefixcap_jpeg_draft"}
    assert all(rate > 0 for name in ("a_hf_processor", "b_prefixcap_uint8") for rate in results[name].values())


def test_attention_benchmark_runs(tmp_path, monkeypatch):
    out = tmp_path / "attention.json"
    run_benchmark("bench_attention.py", "--device", "cpu", "--rows", "2", "--new-tokens", "3", "--json", str(out),
                  monkeypatch=monkeypatch)  # fmt: skip
    shapes = json.loads(out.read_text())["shapes"]
    assert set(shapes) == {"prefill", "decode, first step", "decode, last step"}
    for measured in shapes.values():  # every variant that runs agrees with the float32 reference
        assert all(m["max_abs_error"] < 1e-5 for m in measured.values() if "us" in m)
