"""ONNX export (`prefixcap export onnx`) and the ONNX Runtime backend: the export's own check, the
same tokens as the PyTorch engine, the Captioner / CLI / server on an export folder, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import numpy
import pytest
import torch

from prefixcap import Captioner, CaptionModel
from prefixcap.cli import main
from prefixcap.errors import ModelLoadError, UserError
from prefixcap.model.hf_loading import read_safetensors
from prefixcap.onnx import export as export_module
from prefixcap.onnx.export import (
    INT4_BLOCK_SIZE,
    QUANTIZED_TOLERANCE,
    ExportCheckError,
    check_export,
    dequantize_int4,
    export_onnx,
    int4_blocks,
)
from prefixcap.onnx.manifest import FORMAT_VERSION, MANIFEST_NAME
from prefixcap.onnx.runtime import OnnxCaptionModel, OrtDecoder, is_onnx_export
from prefixcap.testing import COLOURS, colour_image
from tests.helpers_engine import RAGGED, assert_rows_decode_as_alone, engine, ragged_prefixes, stop_ids_seen_in
from tests.reference import assert_distinct, captions_one_by_one
from tests.test_web_browser import INT4_AGREEMENT, MIN_DISTINCT_CAPTIONS, images, python_tokens  # noqa: F401 (fixture)
from tests.test_web_export import onnx_exports  # noqa: F401 (fixture)

onnx = pytest.importorskip("onnx")  # the onnx extra: onnx, onnxruntime, onnxscript
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def onnx_dir(image_dependent_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export of a model whose captions depend on the image, so that captions handed to the
    wrong image show."""
    directory = tmp_path_factory.mktemp("onnx") / "fp32"
    export_onnx(image_dependent_model_dir, directory)
    return directory


@pytest.fixture(scope="module")
def pytorch_model(image_dependent_model_dir: Path) -> CaptionModel:
    return CaptionModel.from_pretrained(image_dependent_model_dir, device="cpu", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def onnx_model(onnx_dir: Path) -> OnnxCaptionModel:
    return OnnxCaptionModel.from_pretrained(onnx_dir)


@pytest.fixture(scope="module")
def colours(
    image_dependent_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CaptionModel, OnnxCaptionModel]:
    """The image-dependent model (its tokens follow its prefix, where the untrained one's barely do)
    and its export."""
    directory = tmp_path_factory.mktemp("onnx") / "colours"
    export_onnx(image_dependent_model_dir, directory)
    pytorch = CaptionModel.from_pretrained(image_dependent_model_dir, device="cpu", dtype=torch.float32).eval()
    return pytorch, OnnxCaptionModel.from_pretrained(directory)


def _pixels(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------- the export and its check
def test_export_writes_graphs_embeddings_and_a_manifest(onnx_dir: Path, pytorch_model: CaptionModel) -> None:
    manifest = json.loads((onnx_dir / MANIFEST_NAME).read_text())
    assert {"encoder.onnx", "decoder.onnx", "embeddings.safetensors", "tokenizer", "image_processor"} <= {
        path.name for path in onnx_dir.iterdir()
    }
    config = pytorch_model.decoder.config
    assert manifest["prefix_length"] == pytorch_model.config.prefix_length == 4
    assert manifest["stop_token_ids"] == pytorch_model.stop_token_ids()
    assert manifest["pad_token_id"] == pytorch_model.tokenizer.pad_token_id
    assert (manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]) == (
        config.n_layer,
        config.n_head,
        8,
    )
    assert (manifest["dtype"], manifest["quantize"], manifest["opset"]) == ("float32", None, 18)
    assert set(manifest["checked"]) == {"fp32"} and manifest["checked"]["fp32"]["decoder"] <= 1e-4
    assert "fp32" in manifest["tolerance"]
    for name in ("encoder.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(onnx_dir / name))


def _scale_largest_weight(graph: Path, factor: float) -> None:
    """Damage a graph the way a bad exporter or a corrupted file would: scale its largest weight."""
    model = onnx.load(str(graph))
    tensor = max(model.graph.initializer, key=lambda init: int(torch.tensor(init.dims).prod()) if init.dims else 0)
    array = onnx.numpy_helper.to_array(tensor) * factor
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    onnx.save(model, str(graph))


@pytest.mark.parametrize(("graph", "message"), [("decoder.onnx", "logits at the prefill"), ("encoder.onnx", "prefix")])
def test_the_check_catches_damaged_weights(
    onnx_dir: Path, pytorch_model: CaptionModel, tmp_path: Path, graph: str, message: str
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(onnx_dir, damaged)
    check_export(pytorch_model, damaged)  # intact: passes
    _scale_largest_weight(damaged / graph, 1.01)
    with pytest.raises(ExportCheckError, match=f"{graph}: ONNX Runtime's {message}.* differ from PyTorch's"):
        check_export(pytorch_model, damaged)


def test_the_check_covers_rows_of_different_lengths(
    onnx_dir: Path, pytorch_model: CaptionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph that ran every row as the longest (as a decoder ignoring the per-row lengths would)
    fails the export's check."""
    run = OrtDecoder.__call__
    monkeypatch.setattr(
        OrtDecoder, "__call__", lambda self, embeds, start, cache, lengths=None: run(self, embeds, start, cache)
    )
    with pytest.raises(ExportCheckError, match="logits of a row of 3 positions in a batch of different lengths"):
        check_export(pytorch_model, onnx_dir)


@pytest.mark.slow
def test_an_export_failing_its_check_is_not_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    original = export_module.export_decoder

    def damaged_export(decoder, path, shape, **kwargs):
        original(decoder, path, shape, **kwargs)
        _scale_largest_weight(path, 1.01)

    with mock.patch.object(export_module, "export_decoder", damaged_export), pytest.raises(ExportCheckError):
        export_onnx(tiny_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # no staging folder left either


@pytest.mark.slow
def test_export_refuses_a_foreign_folder_and_replaces_an_export_only_when_asked(
    tiny_model_dir: Path, onnx_dir: Path, tmp_path: Path
) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match="is not empty and is not a prefixcap ONNX export"):
        export_onnx(tiny_model_dir, foreign, overwrite=True)
    assert (foreign / "keep.jpg").read_bytes() == b"mine"

    earlier = tmp_path / "earlier"
    shutil.copytree(onnx_dir, earlier)
    assert main(["export", "onnx", str(tiny_model_dir), str(earlier)]) == 2  # needs --overwrite
    assert main(["export", "onnx", str(tiny_model_dir), str(earlier), "--overwrite"]) == 0
    assert is_onnx_export(earlier)


# ---------------------------------------------------------------------- decoding: the engine's tokens
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 20, "seed": 3, "num_return_sequences": 2},
        {"prompt": "a photo of", "repetition_penalty": 1.3},
    ],
    ids=["greedy", "beam", "sampling", "prompt"],
)
def test_onnx_runtime_gives_the_pytorch_engines_tokens(
    pytorch_model: CaptionModel, onnx_model: OnnxCaptionModel, options: dict
) -> None:
    pixels = _pixels(3)  # batched
    expected = pytorch_model.generate(pixels=pixels, max_new_tokens=12, **options)
    assert torch.equal(onnx_model.generate(pixels=pixels, max_new_tokens=12, **options), expected)


def test_captioner_and_cli_caption_from_an_export(
    image_dependent_model_dir: Path, onnx_dir: Path, example_images: list[Path], capsys
) -> None:
    exported = Captioner.from_pretrained(onnx_dir)
    assert exported.decoding_path == "ONNX Runtime"
    assert exported.precision == "float32 (ONNX export)"
    pytorch = Captioner.from_pretrained(image_dependent_model_dir, device="cpu", dtype="float32")
    options = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 8}
    assert exported(example_images, **options) == captions_one_by_one(pytorch, example_images, **options)

    paths = [str(path) for path in example_images[:2]]
    assert main(["caption", *paths, "--model", str(image_dependent_model_dir), "--dtype", "float32"]) == 0
    expected = capsys.readouterr().out
    alone = captions_one_by_one(pytorch, paths)
    assert expected.splitlines() == [f"{path}\t{captions[0]}" for path, captions in zip(paths, alone, strict=True)]
    assert main(["caption", *paths, "--model", str(onnx_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected
    assert "dtype: float32 (ONNX export)" in captured.err


def test_the_server_runs_an_export(onnx_dir: Path, example_images: list[Path]) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from prefixcap.serving import ServerConfig, create_app
    from prefixcap.serving.app import CAPTION_PATH

    captioner = Captioner.from_pretrained(onnx_dir)
    with TestClient(create_app(captioner, ServerConfig(model_name="onnx"))) as client:
        assert client.get("/health").json()["device"] == "cpu"
        files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in example_images[:2]]
        answer = client.post(CAPTION_PATH, files=files, data={"num_beams": "2", "max_new_tokens": "6"})
    assert answer.status_code == 200
    texts = [[item["generated_text"] for item in entry] for entry in answer.json()]
    assert texts == captions_one_by_one(captioner, example_images[:2], num_beams=2, max_new_tokens=6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "cuda"}, "runs on CPU with ONNX Runtime"),
        ({"dtype": "bfloat16"}, "runs float32 activations"),
        ({"quantize": "int8"}, "quantization is chosen at export"),
    ],
)
def test_settings_fixed_at_export_are_refused_in_one_line(onnx_dir: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Captioner.from_pretrained(onnx_dir, **kwargs)


def test_stored_image_embeddings_need_the_pytorch_model(onnx_model: OnnxCaptionModel) -> None:
    with pytest.raises(UserError, match="captions images from their pixels"):
        onnx_model.caption(image_embeds=torch.zeros(1, 24))


def test_a_damaged_manifest_is_one_line(onnx_dir: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(onnx_dir, damaged)
    (damaged / MANIFEST_NAME).write_text('{"format": "prefixcap-onnx", "format_version": 99}')
    with pytest.raises(UserError, match="format_version 99 is newer"):
        Captioner.from_pretrained(damaged)
    for older in (1, FORMAT_VERSION - 1):  # FORMAT_VERSION - 1: one past length for all rows
        (damaged / MANIFEST_NAME).write_text(f'{{"format": "prefixcap-onnx", "format_version": {older}}}')
        with pytest.raises(UserError, match=f"format_version {older} was written by an older prefixcap; export"):
            Captioner.from_pretrained(damaged)


def test_a_decoder_graph_without_per_row_lengths_is_refused(onnx_dir: Path, tmp_path: Path) -> None:
    """A decoder graph of format 3 (one past_length for all rows) under a current manifest: refused
    in one line before anything runs, as the version check refuses a format 3 manifest."""
    export = Path(shutil.copytree(onnx_dir, tmp_path / "export"))
    graph = onnx.load(str(export / "decoder.onnx"))
    for node in graph.graph.node:
        node.input[:] = ["past_length" if name == "lengths" else name for name in node.input]
    next(arg for arg in graph.graph.input if arg.name == "lengths").name = "past_length"
    onnx.save(graph, str(export / "decoder.onnx"))
    with pytest.raises(ModelLoadError, match="lacks the inputs and outputs of a prefixcap decoder graph") as info:
        OnnxCaptionModel.from_pretrained(export)
    assert "\n" not in str(info.value)


def test_an_export_whose_tokenizer_asks_for_custom_code_is_refused(
    onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export's tokenizer loads with trust_remote_code=False, and an auto_map is
    refused before transformers could ask on stdin to run the folder's Python."""
    import sys

    from transformers import dynamic_module_utils

    export = Path(shutil.copytree(onnx_dir, tmp_path / "export"))
    marker = tmp_path / "ran"
    config = export / "tokenizer" / "tokenizer_config.json"
    custom = {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
    config.write_text(json.dumps({**json.loads(config.read_text()), **custom}))
    (export / "tokenizer" / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(UserError, match="auto_map"):
        Captioner.from_pretrained(export)
    assert not asked and not marker.exists()


# ---------------------------------------------------------------------- the manifest is checked
def edited_export(onnx_dir: Path, out: Path, **changes) -> Path:
    """A copy of the export whose manifest has `changes` (objects are merged into the manifest's own)."""
    shutil.copytree(onnx_dir, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for key, value in changes.items():
        manifest[key] = {**manifest[key], **value} if isinstance(value, dict) else value
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("absolute", "files.encoder: .* lies outside the export folder"),
        ("parent", "files.tokenizer: .* lies outside the export folder"),
        ("link", "files.decoder: .* lies outside the export folder"),
    ],
)
def test_manifest_paths_outside_the_export_are_refused(onnx_dir: Path, tmp_path: Path, where: str, reason: str) -> None:
    """`files.*` naming another folder's graph or tokenizer (absolute, `../`, or through a link
    inside the folder) was loaded; a manifest is checked, never trusted."""
    other = Path(shutil.copytree(onnx_dir, tmp_path / "other"))
    files = {
        "absolute": {"encoder": str(other / "encoder.onnx")},
        "parent": {"tokenizer": "../other/tokenizer"},
        "link": {"decoder": "linked.onnx"},
    }[where]
    export = edited_export(onnx_dir, tmp_path / "export", files=files)
    (export / "linked.onnx").symlink_to(other / "decoder.onnx")
    with pytest.raises(ModelLoadError, match=reason) as info:
        OnnxCaptionModel.from_pretrained(export)
    assert str(export / MANIFEST_NAME) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"num_layers": 1e8}, "num_layers must be a whole number"),
        ({"num_layers": 1}, "num_layers 1 differs from the decoder graph's 2 layers"),
        ({"num_layers": 3}, "num_layers 3 differs from the decoder graph's 2 layers"),
        ({"num_kv_heads": 10**6}, "num_kv_heads 1000000 differs from the decoder graph's 4"),
        ({"head_dim": 10**6}, "head_dim 1000000 differs from the decoder graph's 8"),
        ({"hidden_size": 64}, "hidden_size 64 differs from the decoder graph's 32"),
        ({"vocab_size": 10}, "vocab_size 10 differs from the decoder graph's 373"),
        ({"prefix_length": 5}, "prefix_length 5 differs from caption_config's 4"),
        (
            {"prefix_length": 5, "caption_config": {"prefix_length": 5}},
            "prefix_length 5 differs from the encoder graph's 4",
        ),
        ({"max_positions": 100_000}, "max_positions 100000 is more than the decoder graph's 96 positions"),
        ({"max_positions": True}, "max_positions must be a whole number"),
        ({"max_positions": 4}, "max_positions 4 leaves no room after the prefix"),
    ],
    ids=[
        "layers_1e8",
        "layers_1",
        "layers_3",
        "kv_heads",
        "head_dim",
        "hidden",
        "vocab",
        "prefix",
        "prefix_both",
        "positions",
        "positions_bool",
        "positions_4",
    ],  # fmt: skip
)
def test_manifest_numbers_are_checked_against_the_graphs(
    onnx_dir: Path, tmp_path: Path, changes: dict, reason: str
) -> None:
    """The manifest's sizes drive the cache and the bindings: 1e8 layers, huge heads or positions
    beyond the graph's table gave tracebacks, excess memory or a server 500. The graphs' own input
    and output shapes decide."""
    export = edited_export(onnx_dir, tmp_path / "export", **changes)
    with pytest.raises(ModelLoadError, match=reason) as info:
        OnnxCaptionModel.from_pretrained(export)
    assert str(export / MANIFEST_NAME) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"weight": torch.zeros(373, 31)}, r"tensor 'weight' has shape \(373, 31\), but the graphs need \(373, 32\)"),
        ({"weight": torch.full((373, 32), float("nan"))}, "non-finite values"),
        ({"weight": torch.zeros(373, 32, dtype=torch.int32)}, "tensor 'weight' is int32, not floating point"),
        ({"weights": torch.zeros(373, 32)}, "holds weights, not the one tensor 'weight'"),
    ],
    ids=["shape", "nan", "int", "name"],
)
def test_embeddings_of_the_wrong_shape_or_not_finite_are_refused(
    onnx_dir: Path, tmp_path: Path, tensors: dict, reason: str
) -> None:
    from safetensors.torch import save_file

    export = Path(shutil.copytree(onnx_dir, tmp_path / "export"))
    save_file(tensors, export / "embeddings.safetensors")
    with pytest.raises(ModelLoadError, match=reason) as info:
        OnnxCaptionModel.from_pretrained(export)
    assert str(export / "embeddings.safetensors") in str(info.value) and "\n" not in str(info.value)


def test_export_overwrite_never_deletes_what_the_user_keeps_in_an_export(
    tiny_model_dir: Path, onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An export folder is recognised by its exact contents, as model folders are."""
    export = Path(shutil.copytree(onnx_dir, tmp_path / "export"))
    (export / "NOTES.md").write_text("notes")
    assert main(["export", "onnx", str(tiny_model_dir), str(export), "--overwrite"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NOTES.md" in errors[0], errors
    assert (export / "NOTES.md").read_text() == "notes" and sorted(path.name for path in tmp_path.iterdir()) == [
        "export"
    ]


def test_the_decoder_graph_runs_unshared_as_the_manifest_says(colours: tuple[CaptionModel, OnnxCaptionModel]) -> None:
    """Run plainly (the longest past in, past + new out, as another runtime would from the
    manifest), the graph gives the logits, keys and values that OrtDecoder's shared cache holds,
    for rows of different lengths (right-padded: row 1 is one position shorter)."""
    decoder = colours[1].decoder
    embeds = torch.randn(2, 3, decoder.hidden_size, generator=torch.Generator().manual_seed(0))
    step = decoder.embed(torch.tensor([5, 7]))
    prefill_lengths, step_lengths = torch.tensor([3, 2]), torch.tensor([4, 3])
    cache = decoder.new_cache(2, 6)  # one position longer than needed: the graph must not read it
    cache[:, :, :, :, 4:] = float("nan")
    decoder(embeds, 0, cache, prefill_lengths)
    shared_logits = decoder(step, 3, cache, step_lengths)

    def unshared(inputs: torch.Tensor, lengths: torch.Tensor, past: list) -> list:
        feeds = {"inputs_embeds": inputs.numpy(), "lengths": lengths.numpy()}
        return decoder.graph.run(None, {**feeds, **dict(zip(decoder.past_names, past, strict=True))})

    empty = numpy.zeros((2, decoder.num_kv_heads, 0, decoder.head_dim), dtype=numpy.float32)
    _, *present = unshared(embeds, prefill_lengths, [empty] * len(decoder.past_names))
    logits, *present = unshared(step, step_lengths, present)
    torch.testing.assert_close(torch.from_numpy(logits).squeeze(1), shared_logits)
    alone = decoder.new_cache(1, 3)  # row 1 on its own: its two positions, then the step
    decoder(embeds[1:, :2], 0, alone)
    torch.testing.assert_close(decoder(step[1:], 2, alone)[0], shared_logits[1])
    flat = cache.flatten(0, 1)
    for got, expected in zip(present, flat, strict=True):
        for row, length in enumerate(step_lengths.tolist()):  # each row's own positions
            torch.testing.assert_close(torch.from_numpy(got[row, :, :length]), expected[row, :, :length])


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_onnx_runtime_decodes_rows_of_different_lengths_as_alone(
    colours: tuple[CaptionModel, OnnxCaptionModel], search: str
) -> None:
    """Rows of different prefix lengths (per-row `lengths` through the graph) decode in one batch,
    each as alone, and as the PyTorch engine decodes the same batch."""
    pytorch, exported = colours
    options, per_input = {"greedy": ({}, 1), "beam": ({"num_beams": 3, "num_return_sequences": 2}, 2)}[search]
    prefix = ragged_prefixes(RAGGED, seed=4, width=exported.decoder.hidden_size)
    stop_ids = stop_ids_seen_in(pytorch.decoder, prefix, [(0, 2), (1, 5), (3, 8)], lengths=RAGGED)

    def decode(rows: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
        return engine(exported.decoder, rows, stop_ids, lengths=lengths, max_new_tokens=12, **options)

    assert_rows_decode_as_alone(decode, prefix, RAGGED, per_input)
    expected = engine(pytorch.decoder, prefix, stop_ids, lengths=RAGGED, max_new_tokens=12, **options)
    assert torch.equal(decode(prefix, RAGGED), expected)


def test_prompts_of_different_lengths_caption_in_one_batch_on_onnx_runtime(
    colours: tuple[CaptionModel, OnnxCaptionModel],
) -> None:
    """Each image with its own prompt (as retrieval gives them): one batch on ONNX Runtime, the
    captions of each image alone, and the PyTorch model's."""
    from prefixcap.testing import COLOURS, colour_image

    pytorch, exported = colours
    pixels = torch.stack([torch.from_numpy(colour_image(name)).permute(2, 0, 1) for name in list(COLOURS)[:4]])
    prompts = ["a photo of", "", None, "a photo of a shape and"]
    options = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 8}
    alone = [exported.caption(pixels=pixels[i : i + 1], prompts=[p], **options)[0] for i, p in enumerate(prompts)]
    assert len({captions[0] for captions in alone}) == len(prompts)  # the images get different captions
    captions = exported.caption(pixels=pixels, prompts=prompts, **options)
    assert captions == alone
    assert captions == pytorch.caption(pixels=pixels, prompts=prompts, **options)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # llama: grouped-query attention, rotary positions
def test_the_exported_attention_computes_the_decoders_own_step(tmp_path: Path, family: str) -> None:
    """In PyTorch, the exported module (the GroupQueryAttention op's reference body in place of the
    decoder's attention) gives the HF forward's logits, keys and values: a prefill, then a cached step."""
    from transformers import AutoModelForCausalLM

    from prefixcap.onnx.attention import attention_of
    from prefixcap.onnx.export import DecoderGraph, DecoderStep, cache_shape
    from prefixcap.testing import build_decoder

    decoder = AutoModelForCausalLM.from_pretrained(build_decoder(tmp_path, family)).eval()
    shape = cache_shape(decoder)
    generator = torch.Generator().manual_seed(0)
    hidden = decoder.get_input_embeddings().embedding_dim
    prefix, step = torch.randn(2, 5, hidden, generator=generator), torch.randn(2, 1, hidden, generator=generator)
    past = [torch.zeros(2, shape.kv_heads, 0, shape.head_dim)] * (2 * shape.layers)
    with torch.no_grad():
        expected = DecoderStep(decoder)(prefix, past)
        expected_step = DecoderStep(decoder)(step, list(expected[1:]))
        with attention_of(decoder):
            got = DecoderGraph(decoder)(prefix, torch.tensor([5, 5]), past)
            got_step = DecoderGraph(decoder)(step, torch.tensor([6, 6]), list(got[1:]))
    for got_outputs, expected_outputs in ((got, expected), (got_step, expected_step)):
        assert len(got_outputs) == len(expected_outputs) == 1 + 2 * shape.layers
        torch.testing.assert_close(got_outputs[0].squeeze(1), expected_outputs[0])  # the graph's logits: [rows, 1, V]
        for got_tensor, expected_tensor in zip(got_outputs[1:], expected_outputs[1:], strict=True):
            torch.testing.assert_close(got_tensor, expected_tensor)


# ---------------------------------------------------------------------- int8 and other decoders
@pytest.mark.slow
def test_int8_export_agrees_with_float32(image_dependent_model_dir: Path, onnx_dir: Path, tmp_path: Path) -> None:
    manifest = export_onnx(image_dependent_model_dir, tmp_path / "int8", quantize="int8")
    assert manifest["quantize"] == "int8" and max(manifest["checked"]["int8"].values()) <= 0.05
    for graph in ("encoder.onnx", "decoder.onnx"):
        ops = {node.op_type for node in onnx.load(str(tmp_path / "int8" / graph)).graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, graph
    captioner = Captioner.from_pretrained(tmp_path / "int8", quantize="int8")
    assert captioner.precision == "float32 activations, int8 weights (ONNX export)"
    # graded by the float32 export, not by the manifest's own figure: the same captions
    float32 = Captioner.from_pretrained(onnx_dir)
    colours = [colour_image(name) for name in COLOURS]
    expected = float32(colours, num_beams=2, max_new_tokens=8)
    assert_distinct(expected)
    got = captioner(colours, num_beams=2, max_new_tokens=8)
    agree = sum(a == b for a, b in zip(got, expected, strict=True))
    assert agree >= len(expected) - 1, (got, expected)


@pytest.mark.slow
def test_int4_export_has_4_bit_weights_int4_embeddings_and_mostly_the_float32_captions(
    onnx_exports: dict[str, Path],  # noqa: F811 (the fixture imported above)
    images: list[tuple[str, bytes]],  # noqa: F811
) -> None:
    int4, float32 = onnx_exports["int4"], onnx_exports["float32"]
    manifest = json.loads((int4 / MANIFEST_NAME).read_text())
    assert manifest["quantize"] == "int4" and manifest["quantization"]["op"] == "com.microsoft.MatMulNBits"
    assert manifest["quantization"]["bits"] == 4 and manifest["quantization"]["block_size"] == INT4_BLOCK_SIZE
    assert max(manifest["checked"]["int4"].values()) <= QUANTIZED_TOLERANCE["int4"]
    for graph in ("encoder.onnx", "decoder.onnx"):
        model = onnx.load(str(int4 / graph)).graph
        weights = {tensor.name for tensor in model.initializer}
        float_weights = [n.name for n in model.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
        assert "MatMulNBits" in {node.op_type for node in model.node} and float_weights == [], graph
    embeddings = read_safetensors(int4 / "embeddings.safetensors")["weight"]
    assert torch.equal(dequantize_int4(*int4_blocks(embeddings), embeddings.shape[1]), embeddings)  # int4 values
    assert not torch.equal(embeddings, read_safetensors(float32 / "embeddings.safetensors")["weight"])

    captioner = Captioner.from_pretrained(int4)
    assert captioner.precision == "float32 activations, int4 weights (ONNX export)"
    got = python_tokens(captioner.model, images) + python_tokens(captioner.model, images, num_beams=3)
    reference = OnnxCaptionModel.from_pretrained(float32, threads=1)
    expected = python_tokens(reference, images) + python_tokens(reference, images, num_beams=3)
    assert len({str(rows) for rows in expected}) >= MIN_DISTINCT_CAPTIONS  # the captions depend on the image
    agreement = sum(a == b for a, b in zip(got, expected, strict=True)) / len(expected)
    assert agreement >= INT4_AGREEMENT, f"{agreement:.0%} of int4 captions are the float32 export's"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])  # grouped-query attention; head_dim != hidden / heads
def test_llama_family_decoders_export_and_decode_alike(
    tiny_components: tuple[Path, Path], tmp_path: Path, family: str
) -> None:
    from prefixcap.testing import build_decoder

    decoder = build_decoder(tmp_path / family, family)
    torch.manual_seed(0)
    CaptionModel.from_components(tiny_components[0], decoder, mapper="mlp", prefix_length=4).save_pretrained(
        tmp_path / "model"
    )
    export_onnx(tmp_path / "model", tmp_path / "onnx")
    pytorch = CaptionModel.from_pretrained(tmp_path / "model").eval()
    exported = OnnxCaptionModel.from_pretrained(tmp_path / "onnx")
    prefix = ragged_prefixes(RAGGED, seed=0, width=exported.decoder.hidden_size)
    stop_ids = stop_ids_seen_in(pytorch.decoder, prefix, [(0, 2), (1, 5), (3, 8)], lengths=RAGGED)
    for options, per_input in (({}, 1), ({"num_beams": 3, "num_return_sequences": 2}, 2)):
        expected = pytorch.generate(pixels=_pixels(3), max_new_tokens=10, **options)
        assert torch.equal(exported.generate(pixels=_pixels(3), max_new_tokens=10, **options), expected)

        def decode(rows: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
            return engine(exported.decoder, rows, stop_ids, lengths=lengths, max_new_tokens=12, **options)  # noqa: B023

        assert_rows_decode_as_alone(decode, prefix, RAGGED, per_input)  # rotary positions per row
