"""CPU speed options: `--dtype auto` (bf16 only where the CPU multiplies bf16 fast) and
`--quantize int8`, and a guard that neither changes what a trained model says."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from prefixcap import Captioner
from prefixcap.cli import main
from prefixcap.errors import UserError
from prefixcap.system import hardware
from tests.helpers_engine import hf_generate_only
from tests.helpers_pipeline import exact_matches


@pytest.mark.parametrize(
    ("flags", "fast"),
    [({"avx2", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True), ({"avx2", "avx512f", "avx512_vnni"}, False)],
)
def test_fast_bf16_is_read_from_the_cpu_flags(monkeypatch, flags: set[str], fast: bool) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.cpu_has_fast_bf16() is fast


@pytest.mark.parametrize(("fast", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_follows_the_cpu(monkeypatch, tiny_model_dir: Path, fast: bool, dtype: torch.dtype) -> None:
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast)
    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu")
    assert captioner.model.decoder.dtype == dtype
    reason = "this CPU has AMX or AVX512-BF16" if fast else "this CPU has no AMX or AVX512-BF16"
    assert captioner.precision == f"{str(dtype).removeprefix('torch.')} ({reason})"


def test_explicit_dtype_wins_over_the_cpu(monkeypatch, tiny_model_dir: Path) -> None:
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    assert captioner.model.decoder.dtype == torch.float32
    assert captioner.precision == "float32 (as asked)"


def test_cli_says_which_dtype_it_picked(monkeypatch, capsys, tiny_model_dir: Path, example_images) -> None:
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    args = ["caption", str(example_images[0]), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(args) == 0
    assert "dtype: float32 (this CPU has no AMX or AVX512-BF16)\n" in capsys.readouterr().err

    assert main([*args, "--dtype", "bfloat16"]) == 0
    assert "dtype:" not in capsys.readouterr().err  # asked for: nothing to explain


def test_int8_quantizes_the_blocks_and_decodes_with_the_engine(tiny_model_dir: Path, example_images) -> None:
    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu", quantize="int8")
    decoder = captioner.model.decoder
    assert isinstance(decoder.transformer.h[0].attn.c_attn, DynamicInt8Linear)
    assert isinstance(decoder.transformer.h[-1].mlp.c_proj, DynamicInt8Linear)
    assert decoder.lm_head.weight is decoder.transformer.wte.weight  # the tied head stays float
    assert captioner.precision == "float32 (int8 weights take float32 activations)"
    assert captioner.decoding_path == "prefixcap engine (gpt2)"

    # The engine's int8 path gives HF generate's tokens on the same quantized modules.
    for beams in (1, 3):
        engine = captioner(example_images[:2], num_beams=beams, max_new_tokens=8)
        with mock.patch("prefixcap.engine.backends.choose_backend", hf_generate_only):
            reference = captioner(example_images[:2], num_beams=beams, max_new_tokens=8)
        assert engine == reference


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "cuda"}, "--quantize int8 runs on CPU only"),
        ({"device": "cpu", "dtype": "bfloat16"}, "--quantize int8 needs --dtype float32"),
    ],
)
def test_int8_refusals_are_one_line(tiny_model_dir: Path, kwargs: dict, message: str, monkeypatch) -> None:
    from prefixcap.system import hardware

    # as on a machine with a GPU, where the device itself is accepted and int8 is what is refused
    monkeypatch.setattr(hardware, "available_devices", lambda: ["cpu", "cuda:0"])
    with pytest.raises(UserError, match=message):
        Captioner.from_pretrained(tiny_model_dir, quantize="int8", **kwargs)


@pytest.mark.slow
def test_bf16_and_int8_say_what_fp32_says(tmp_path: Path, one_thread, synthetic_model) -> None:
    """A model trained to ≥ 90% exact on the synthetic colours keeps its captions in bf16 and int8,
    and in its ONNX exports run by ONNX Runtime (fp32 and int8), when the onnx extra is installed."""
    model_dir, test = synthetic_model
    images, truth = [record.image for record in test], [record.captions[0] for record in test]
    reference = Captioner.from_pretrained(model_dir, device="cpu", dtype="float32")(images)
    assert exact_matches(reference, truth) >= 0.9 * len(test)
    variants = [
        ("bf16", lambda: Captioner.from_pretrained(model_dir, device="cpu", dtype="bfloat16")),
        ("int8", lambda: Captioner.from_pretrained(model_dir, device="cpu", quantize="int8")),
    ]
    if all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnxscript")):
        variants += [
            (f"onnx {quantize or 'fp32'}", _onnx_export(model_dir, tmp_path, quantize)) for quantize in (None, "int8")
        ]
    for name, load in variants:
        captions = load()(images)
        agree = exact_matches(captions, [caption[0] for caption in reference])
        exact = exact_matches(captions, truth)
        print(f"{name}: agrees with fp32 on {agree}/{len(test)}, exact {exact}/{len(test)}")
        assert agree >= 0.95 * len(test) and exact >= 0.9 * len(test), f"{name}: agrees {agree}, exact {exact}"


def _onnx_export(model_dir: Path, root: Path, quantize: str | None):
    """A loader of the captioner of `model_dir`'s ONNX export (`prefixcap export onnx`)."""
    from prefixcap.onnx.export import export_onnx

    def load() -> Captioner:
        export_onnx(model_dir, root / f"onnx-{quantize or 'fp32'}", quantize=quantize)
        return Captioner.from_pretrained(root / f"onnx-{quantize or 'fp32'}")

    return load
