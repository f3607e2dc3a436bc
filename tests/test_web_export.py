"""`prefixcap export web`: the folder it writes, what it refuses in one line, and how it gets
onnxruntime-web (the browser runs the folder in tests/test_web_browser.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from PIL import Image

from prefixcap.cli import main
from prefixcap.errors import UserError
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.encoders import load_image_processor
from prefixcap.model.hf_loading import read_safetensors
from prefixcap.onnx.export import export_onnx, int4_blocks
from prefixcap.web import ort_web
from prefixcap.web.export import (
    WEB_MANIFEST,
    export_web,
    pillow_shrinks_height_first,
    quantize_rows,
    read_web_manifest,
    text_data,
    write_embeddings,
)

T = TypeVar("T")

# The fixtures below are imported by tests/test_web_browser.py too; what they build is kept here, so
# that it is built once per session whichever module asks first.
_BUILT: dict[str, Any] = {}


def once(key: str, build: Callable[[], T]) -> T:
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


@pytest.fixture(scope="session")
def ort_web_tarball(tmp_path_factory) -> Path:
    """onnxruntime-web's tarball, fetched once with `npm pack` as an export does (npm's cache
    keeps later runs offline) and checked against the pinned integrity."""
    if shutil.which("npm") is None:
        pytest.skip("needs npm (apt-get install npm) to fetch onnxruntime-web")

    def fetch() -> Path:
        tarball = ort_web.fetch_tarball(tmp_path_factory.mktemp("ort-web"))
        ort_web.check_tarball(tarball)
        return tarball

    return once("ort-web", fetch)


@pytest.fixture(scope="session")
def onnx_exports(image_dependent_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The image-dependent model's ONNX exports, float32, int8 and int4 ({"float32": dir, ...})."""

    def build() -> dict[str, Path]:
        root = tmp_path_factory.mktemp("onnx")
        export_onnx(image_dependent_model_dir, root / "float32")
        for quantize in ("int8", "int4"):
            export_onnx(image_dependent_model_dir, root / quantize, quantize=quantize)
        return {precision: root / precision for precision in ("float32", "int8", "int4")}

    return once("onnx", build)


@pytest.fixture(scope="session")
def web_exports(onnx_exports, ort_web_tarball, tmp_path_factory) -> dict[str, Path]:
    """Web exports of both ONNX exports."""

    def build() -> dict[str, Path]:
        root = tmp_path_factory.mktemp("web")
        for precision, source in onnx_exports.items():
            export_web(source, root / precision, ort_web_tarball=ort_web_tarball)
        return {precision: root / precision for precision in onnx_exports}

    return once("web", build)


def test_the_folder_holds_the_graphs_the_runtime_and_what_javascript_needs(onnx_exports, web_exports):
    source, out = onnx_exports["float32"], web_exports["float32"]
    manifest = read_web_manifest(out)
    onnx_manifest = json.loads((source / "prefixcap_onnx.json").read_text())
    for name in ("encoder", "decoder"):  # the ONNX export's graphs, unchanged
        assert (out / manifest["files"][name]).read_bytes() == (source / f"{name}.onnx").read_bytes()
    assert manifest["sizes"] == {name: (out / path).stat().st_size for name, path in manifest["files"].items()}
    weight = read_safetensors(out / manifest["files"]["embeddings"])["weight"]
    assert torch.equal(weight, read_safetensors(source / "embeddings.safetensors")["weight"])
    assert json.loads((out / manifest["files"]["text"]).read_text()) == text_data(source / "tokenizer")

    preprocessor = ImagePreprocessor(load_image_processor(source / "image_processor"))
    levels = torch.tensor(manifest["image"]["levels"], dtype=torch.float32)
    assert torch.equal(levels, preprocessor.lookup)  # exact through JSON
    assert manifest["image"]["resize"] == {
        "shortest_edge": 32, "height": 32, "width": 32, "resample": Image.Resampling.BICUBIC,
        "vertical_first": pillow_shrinks_height_first(),
    }  # fmt: skip
    for key in ("prompt_ids", "stop_token_ids", "pad_token_id"):
        assert manifest["text"][key] == onnx_manifest[key]
    assert manifest["generation"]["max_new_tokens"] == onnx_manifest["generation"]["max_new_tokens"]
    assert manifest["model"]["vocab_size"] == onnx_manifest["vocab_size"]

    assert manifest["precision"] == "float32" and set(manifest["ort"]["bundles"]) == {"wasm", "webgpu"}
    assert manifest["ort"]["version"] == ort_web.VERSION and manifest["ort"]["integrity"] == ort_web.INTEGRITY
    for bundle in ("wasm", "webgpu"):
        for name in ort_web.BUNDLES[bundle]:
            assert (out / "ort" / name).stat().st_size > 1000, name
    assert ort_web.VERSION in (out / "ort" / "NOTICE.txt").read_text()
    for name in ("index.html", "page.js", "captioner.js", "preprocess.js", "search.js", "text.js"):
        assert (out / name).is_file()
    assert "Cross-Origin-Embedder-Policy: require-corp" in (out / "_headers").read_text()
    # nothing names this machine's folders: the folder is meant for public hosting
    assert str(source.parent) not in (out / WEB_MANIFEST).read_text()


def test_an_int8_export_runs_on_wasm_with_its_lm_heads_int8_embeddings(onnx_exports, web_exports):
    """The int8 LM head of a tied decoder holds each token's embedding quantized as the page
    quantizes it (a column of [hidden, vocab] int8 values, one scale per token): the export ships
    them once, in decoder.onnx, and the manifest says where."""
    from onnx import load_from_string, numpy_helper

    manifest = read_web_manifest(web_exports["int8"])
    assert manifest["precision"] == manifest["embeddings"] == "int8"
    assert set(manifest["ort"]["bundles"]) == {"wasm"}  # MatMulInteger has no WebGPU kernel
    assert not (web_exports["int8"] / "ort" / ort_web.BUNDLES["webgpu"][-1]).exists()
    assert "embeddings" not in manifest["files"] and manifest["int4_embeddings"] is None
    assert not (web_exports["int8"] / "model" / "embeddings.safetensors").exists()
    reference = read_safetensors(onnx_exports["int8"] / "embeddings.safetensors")["weight"].float()
    stored = quantize_rows(reference)
    error = (stored["weight"].float() * stored["scale"].unsqueeze(1) - reference).abs()
    assert (error <= stored["scale"].unsqueeze(1) / 2 + 1e-7).all()  # rounded to the nearest step
    decoder = (web_exports["int8"] / manifest["files"]["decoder"]).read_bytes()
    columns = stored["weight"].T.contiguous().numpy()
    (weight_at, weight_length), (scale_at, scale_length) = manifest["int8_embeddings"].values()
    assert decoder[weight_at : weight_at + weight_length] == columns.tobytes()
    assert decoder[scale_at : scale_at + scale_length] == stored["scale"].numpy().tobytes()
    initializers = load_from_string(decoder).graph.initializer
    assert any(numpy_helper.to_array(tensor).tobytes() == columns.tobytes() for tensor in initializers)


def test_an_int4_export_reads_a_tied_decoders_embeddings_from_its_lm_head(onnx_exports, web_exports, tmp_path):
    from onnx import load_from_string, numpy_helper

    manifest = read_web_manifest(web_exports["int4"])
    assert manifest["precision"] == manifest["embeddings"] == "int4" and manifest["onnx"]["quantize"] == "int4"
    assert set(manifest["ort"]["bundles"]) == {"wasm"}  # the WebGPU build would add 29 MB
    assert (
        "embeddings" not in manifest["files"]
        and not (web_exports["int4"] / "model" / "embeddings.safetensors").exists()
    )
    # the ranges hold the int4 blocks of the ONNX export's embeddings, which are the LM head's
    spec = manifest["int4_embeddings"]
    decoder = (web_exports["int4"] / manifest["files"]["decoder"]).read_bytes()
    embeddings = read_safetensors(onnx_exports["int4"] / "embeddings.safetensors")["weight"]
    packed, scales = int4_blocks(embeddings)
    (weight_at, weight_length), (scale_at, scale_length) = spec["weight"], spec["scale"]
    assert decoder[weight_at : weight_at + weight_length] == packed.tobytes()
    assert decoder[scale_at : scale_at + scale_length] == scales.tobytes()
    lm_head = load_from_string(decoder).graph.initializer
    assert any(numpy_helper.to_array(tensor).tobytes() == packed.tobytes() for tensor in lm_head)
    model_bytes = {
        kind: sum(path.stat().st_size for path in (web_exports[kind] / "model").iterdir()) for kind in web_exports
    }
    assert model_bytes["int4"] < model_bytes["int8"]  # on the tiny model; bench_web.py measures the full-size one
    # a decoder without those blocks (untied embeddings) gets them in a file of their own
    decoder_copy = tmp_path / "decoder.onnx"
    decoder_copy.write_bytes(decoder.replace(packed.tobytes(), bytes(len(packed.tobytes()))))
    assert write_embeddings(embeddings, "int4", tmp_path, tmp_path / "source") is None
    stored = read_safetensors(tmp_path / "embeddings.safetensors")
    assert stored["weight"].numpy().tobytes() == packed.tobytes() and torch.equal(
        stored["scale"], torch.from_numpy(scales)
    )
    with pytest.raises(UserError, match="not int4 values"):
        write_embeddings(embeddings * 1.01, "int4", tmp_path, tmp_path / "source")


def test_the_command_exports_a_model_directory(image_dependent_model_dir, ort_web_tarball, tmp_path, capsys):
    out = tmp_path / "web"
    args = [
        "export",
        "web",
        str(image_dependent_model_dir),
        str(out),
        "--quantize",
        "int8",
        "--ort-web",
        str(ort_web_tarball),
    ]
    assert main(args) == 0
    assert f"wrote {out} (int8, " in capsys.readouterr().out
    manifest = read_web_manifest(out)
    assert manifest["precision"] == "int8" and manifest["name"] == image_dependent_model_dir.name
    # no embeddings file: they are the tied LM head's
    assert sorted(path.name for path in (out / "model").iterdir()) == ["decoder.onnx", "encoder.onnx", "text.json"]
    assert not [path for path in out.iterdir() if path.name.startswith(".")]  # the scratch ONNX export is gone
    assert main([*args, "--quantize", "int8"]) == 2  # an earlier export is replaced only with --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    (out / "NOTES.md").write_text("mine")  # a file the user keeps in the export is never deleted
    assert main([*args, "--overwrite"]) == 2
    assert "NOTES.md" in capsys.readouterr().err and (out / "NOTES.md").read_text() == "mine"


def test_a_bad_manifest_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="not a prefixcap web export"):
        read_web_manifest(tmp_path)
    manifest = tmp_path / WEB_MANIFEST
    manifest.write_text('{"format": "another"}')
    with pytest.raises(UserError, match="format is not 'prefixcap-web'"):
        read_web_manifest(tmp_path)
    manifest.write_text(json.dumps({"format": "prefixcap-web", "format_version": 1, "padding": "x" * (1 << 22)}))
    with pytest.raises(UserError, match=r"cannot read .* over the 4,194,304-byte limit"):
        read_web_manifest(tmp_path)


def copy_of(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "copy"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("quantize", "this ONNX export is float32; export the model directory with --quantize int8"),
        ("decoder", "its decoder WordPiece is not supported (supported: ByteLevel"),
        ("resample", "the browser cannot resize with resample=0"),
        ("rule", "the browser cannot preprocess for CLIPImageProcessorPil: its resize rule is not supported"),
        ("sampling", "the model's default is sampling, which the browser captioner does not offer"),
    ],
)
def test_what_the_browser_cannot_do_is_refused_in_one_line(change, message, onnx_exports, tmp_path):
    source = copy_of(onnx_exports["float32"], tmp_path)
    quantize = None
    if change == "quantize":
        quantize = "int8"
    elif change == "decoder":  # BERT's WordPiece tokenizer
        from transformers import BertTokenizerFast

        shutil.rmtree(source / "tokenizer")
        (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat", "##s"]))
        BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(source / "tokenizer")
    else:
        path = source / "image_processor" / "preprocessor_config.json"
        config = json.loads(path.read_text())
        if change == "resample":
            config["resample"] = 0  # NEAREST
        elif change == "rule":
            config["crop_size"] = {"height": 64, "width": 64}  # larger than the resize: the processor pads
        else:
            path = source / "prefixcap_onnx.json"
            config = json.loads(path.read_text())
            config["generation"]["do_sample"] = True
        path.write_text(json.dumps(config))
    with pytest.raises(UserError) as refusal:
        export_web(source, tmp_path / "out", quantize=quantize, ort_web_tarball=tmp_path / "never read.tgz")
    assert message in str(refusal.value) and "\n" not in str(refusal.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_an_export_is_never_written_into(onnx_exports, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and is not a prefixcap web export"):
        export_web(onnx_exports["float32"], tmp_path, ort_web_tarball=tmp_path / "never read.tgz")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_only_the_pinned_onnxruntime_web_release_is_used(onnx_exports, ort_web_tarball, tmp_path, monkeypatch):
    tampered = tmp_path / ort_web.tarball_name()
    tampered.write_bytes(ort_web_tarball.read_bytes() + b"\0")
    with pytest.raises(UserError, match=f"not the onnxruntime-web {ort_web.VERSION} tarball from npm"):
        export_web(onnx_exports["float32"], tmp_path / "out", ort_web_tarball=tampered)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(
        UserError, match=f"npm is not installed: install Node.js and npm, or pass --ort-web {tampered.name}"
    ):
        export_web(onnx_exports["float32"], tmp_path / "out", ort_web_tarball=None)
    assert not (tmp_path / "out").exists()
