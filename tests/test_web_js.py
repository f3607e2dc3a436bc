"""The web export's JavaScript against prefixcap's Python: Node's test runner on tests/js/, then the
same inputs through both sides (tests/js/oracle.mjs runs the JavaScript): preprocessing bit for bit
against Pillow, the searches token for token against the decoding engine, text against Hugging Face
tokenizers."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prefixcap import engine
from prefixcap.inputs.images import to_rgb
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.caption_model import CaptionModel
from prefixcap.onnx.export import INT4_BLOCK_SIZE, dequantize_int4, int4_blocks
from prefixcap.options import GenerationOptions
from prefixcap.web.export import SUPPORTED_DECODERS, image_constants, quantize_rows, text_data, write_embeddings

JS_TESTS = Path(__file__).parent / "js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js (apt-get install nodejs)")


def oracle(request: dict) -> object:
    """tests/js/oracle.mjs's answer to `request`."""
    result = subprocess.run(
        [NODE, str(JS_TESTS / "oracle.mjs")], input=json.dumps(request), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def test_node_unit_tests():
    result = subprocess.run([NODE, "--test", str(JS_TESTS)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout


# ---------------------------------------------------------------------------- preprocessing
def processors() -> list[object]:
    """Image processors of each resize rule and every filter preprocess.js reproduces."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    def clip(shortest: int, height: int, width: int, resample: int) -> object:
        return CLIPImageProcessorPil(
            size={"shortest_edge": shortest}, crop_size={"height": height, "width": width}, resample=resample
        )

    return [
        clip(224, 224, 224, Image.Resampling.BICUBIC),  # CLIP ViT-B/32
        clip(36, 32, 32, Image.Resampling.BICUBIC),  # DINOv2's shape of rule, tiny
        clip(50, 40, 30, Image.Resampling.LANCZOS),
        clip(24, 24, 24, Image.Resampling.BILINEAR),
        clip(24, 24, 24, Image.Resampling.BOX),
        clip(24, 24, 24, Image.Resampling.HAMMING),
        SiglipImageProcessorPil(size={"height": 32, "width": 48}, resample=Image.Resampling.BILINEAR),
        SiglipImageProcessorPil(size={"height": 20, "width": 20}, resample=Image.Resampling.LANCZOS),
    ]


def images() -> list[np.ndarray]:
    """Noise and smooth gradients at sizes below, at and above the models' inputs, and banners."""
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (7, 3), (32, 31), (32, 32), (33, 33), (48, 64), (64, 48), (480, 640), (640, 479), (3, 1000)]
    out = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    y, x = np.mgrid[0:300, 0:400]
    out.append(np.stack([x * 255 // 399, y * 255 // 299, (x + y) % 256], axis=-1).astype(np.uint8))
    out.append(rng.integers(0, 256, (200_000, 1, 3), dtype=np.uint8))  # resized in its kept part alone
    return out


def test_preprocessing_is_bit_equal_to_pillow():
    cases, expected = [], []
    for processor in processors():
        preprocessor = ImagePreprocessor(processor)
        geometry = image_constants(preprocessor, Path("processor"))["resize"]
        for array in images():
            cases.append({"rgb": b64(array), "width": array.shape[1], "height": array.shape[0], "geometry": geometry})
            expected.append(preprocessor.pixels(Image.fromarray(array)).permute(1, 2, 0).numpy())
    got = oracle({"op": "pixels", "cases": cases})
    for case, want, answer in zip(cases, expected, got, strict=True):
        pixels = np.frombuffer(base64.b64decode(answer["rgb"]), np.uint8).reshape(answer["height"], answer["width"], 3)
        where = f"{case['width']}x{case['height']} -> {case['geometry']}"
        assert pixels.shape == want.shape, where
        assert np.array_equal(pixels, want), f"{where}: {int((pixels != want).sum())} bytes differ"


def test_transparency_and_normalisation_match_python():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (17, 23, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 255
    answer = oracle({"op": "rgba", "rgba": b64(rgba), "width": 23, "height": 17})
    want = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert np.array_equal(np.frombuffer(base64.b64decode(answer["rgb"]), np.uint8).reshape(want.shape), want)

    preprocessor = ImagePreprocessor(processors()[0])
    pixels = rng.integers(0, 256, (3, 5, 7), dtype=np.uint8)
    levels = image_constants(preprocessor, Path("processor"))["levels"]
    request = {"op": "normalize", "rgb": b64(pixels.transpose(1, 2, 0)), "width": 7, "height": 5, "levels": levels}
    got = np.frombuffer(base64.b64decode(oracle(request)["values"]), np.float32).reshape(3, 5, 7)
    assert np.array_equal(got, preprocessor.normalize(torch.from_numpy(pixels)).numpy())


# ---------------------------------------------------------------------------- search
VOCAB, POSITIONS = 9, 24


class ScriptedForward:
    """A decoder for the engine (`engine.generate`'s forward object) whose logits at position p after
    token t, itself after token s, are first[p, t] + second[s]: tokens live in the KV cache, so the
    engine's beam reordering decides what `s` is. tests/js/oracle.mjs scripts the same model."""

    dtype, device, hidden_size, max_positions = torch.float32, torch.device("cpu"), VOCAB, POSITIONS

    def __init__(self, first: torch.Tensor, second: torch.Tensor):
        self.first, self.second = first, second

    def new_cache(self, rows: int, length: int) -> torch.Tensor:
        return torch.full((1, 2, rows, 1, length, 1), float("nan"))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, VOCAB).float().unsqueeze(1)

    def __call__(self, embeds: torch.Tensor, start: int, cache: torch.Tensor, lengths=None) -> torch.Tensor:
        assert lengths is None  # rows of one length, as the page decodes them
        tokens = embeds.argmax(dim=-1)
        position = start + tokens.shape[1] - 1
        cache[0, 0, :, 0, start : position + 1, 0] = tokens.float()
        previous = cache[0, 0, :, 0, position - 1, 0].long() if position > 0 else torch.full_like(tokens[:, 0], VOCAB)
        return self.first[position, tokens[:, -1]] + self.second[previous]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def refresh(self) -> None:
        pass


SEARCHES = [  # (options, stop ids)
    ({"max_new_tokens": 12}, [2]),
    ({"max_new_tokens": 12, "min_new_tokens": 4, "repetition_penalty": 1.3}, [2, 5]),
    ({"max_new_tokens": 12, "no_repeat_ngram_size": 2}, [2]),
    ({"max_new_tokens": 1}, [2]),
    ({"max_new_tokens": 12, "num_beams": 3}, [2]),
    ({"max_new_tokens": 12, "num_beams": 3, "early_stopping": False}, [2]),
    ({"max_new_tokens": 12, "num_beams": 4, "length_penalty": 0.0, "num_return_sequences": 2}, [2, 5]),
    ({"max_new_tokens": 12, "num_beams": 2, "length_penalty": 2.0, "early_stopping": False}, [2]),
    ({"max_new_tokens": 12, "num_beams": 3, "length_penalty": -0.5, "repetition_penalty": 1.2}, [2]),
    ({"max_new_tokens": 6, "num_beams": 5, "num_return_sequences": 5, "no_repeat_ngram_size": 1}, [2, 5]),
    ({"max_new_tokens": 1, "num_beams": 3}, [2]),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_searches_match_the_engine_token_for_token(seed):
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(POSITIONS, VOCAB, VOCAB, generator=generator) * 2
    first[6:, :, 2] += torch.linspace(0, 4, POSITIONS - 6).unsqueeze(1)  # captions end, some sooner
    second = torch.randn(VOCAB + 1, VOCAB, generator=generator)  # the last row: no previous token
    starts = [0, 3, 7]  # three inputs, each with its own first token
    prefix = F.one_hot(torch.tensor(starts), VOCAB).float().unsqueeze(1)
    tables = {"first": b64(first.numpy()), "second": b64(second.numpy()), "vocab": VOCAB, "no_previous": VOCAB}
    cases, expected = [], []
    for options, stops in SEARCHES:
        generation = GenerationOptions.from_kwargs(options)
        spec = engine.DecodeSpec.of(generation, eos_token_ids=stops, pad_token_id=0)
        ids = engine.generate(ScriptedForward(first, second), prefix, spec)
        expected.append(ids.tolist())
        spec = {"num_beams": 1, **options}
        cases.append({"spec": spec, "starts": starts, "stop_token_ids": stops, "pad_token_id": 0})
    got = oracle({"op": "search", "tables": tables, "cases": cases})
    for (options, _), want, answer in zip(SEARCHES, expected, got, strict=True):
        assert answer == want, options
    assert len({json.dumps(rows) for rows in expected}) > len(SEARCHES) // 2  # the options change the captions


# ---------------------------------------------------------------------------- text
def llama2_style_tokenizer(directory: Path, *, metaspace: bool = False) -> Path:
    """A SentencePiece-style BPE (Llama 2, Mistral): byte fallback, "▁" for spaces, its decoder
    Replace + ByteFallback + Fuse + Strip (or Metaspace), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
    else:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=specials, show_progress=False)
    corpus = ["a photo of a cat on a couch.", "two dogs — café au lait, naïve 🙂 spaces  twice.", "a man riding"]
    tokenizer.train_from_iterator(corpus * 3, trainer=trainer)
    # the 256 byte tokens join the model's vocabulary (not special: HF decode keeps them), as in Llama 2's
    saved = json.loads(tokenizer.to_str())
    vocab = saved["model"]["vocab"]
    vocab |= {f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)}
    tokenizer = Tokenizer.from_str(json.dumps(saved))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["gpt2", "llama2", "metaspace"])
def test_text_matches_hugging_face_decoding(kind, tiny_components, tmp_path):
    from transformers import AutoTokenizer

    directory = (
        tiny_components[1] if kind == "gpt2" else llama2_style_tokenizer(tmp_path, metaspace=kind == "metaspace")
    )
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    rng = np.random.default_rng(0)
    text = "a photo of a cat on a couch. café 🙂  two"
    sequences = [tokenizer.encode(text, add_special_tokens=False), tokenizer.encode(text)]
    sequences += [rng.integers(0, len(tokenizer), int(rng.integers(1, 25))).tolist() for _ in range(300)]
    sequences.append([len(tokenizer) + 5, *sequences[0]])  # an id past the tokenizer: skipped
    expected = [
        CaptionModel.detokenize(SimpleNamespace(tokenizer=tokenizer), torch.tensor([ids]))[0] for ids in sequences
    ]
    got = oracle({"op": "text", "text": text_data(directory), "sequences": sequences})
    assert got[0] == expected[0] and "🙂" in got[0]
    for ids, want, answer in zip(sequences, expected, got, strict=True):
        assert answer == want, ids


def test_python_and_javascript_agree_on_the_supported_decoders():
    assert oracle({"op": "decoders"}) == list(SUPPORTED_DECODERS)


# ---------------------------------------------------------------------------- token embeddings
@pytest.mark.parametrize("precision", ["float32", "int8", "int8 in the decoder", "int4", "int4 in the decoder"])
def test_token_embeddings_read_as_python_reads_them(precision, tmp_path):
    """captioner.js's embeddings equal, bit for bit, the float32 values Python feeds the decoder (int8:
    the values and scales the int8 export quantizes them to): int8 values and int4 blocks from their
    own file (an untied decoder) or from the decoder graph's bytes (a tied one: its LM head's,
    [hidden, vocab] for int8)."""
    vocab, hidden = 40, 48  # hidden: one and a half int4 blocks
    weight = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0))
    kind = precision.split()[0]
    if kind == "int4":
        weight = dequantize_int4(*int4_blocks(weight), hidden)  # what an int4 ONNX export stores
        packed, scales = int4_blocks(weight)
        parts = [b"graph bytes before", scales.tobytes(), b"between", packed.tobytes(), b"after"]
    if kind == "int8":
        rows = quantize_rows(weight)
        parts = [b"graph bytes before", rows["weight"].T.contiguous().numpy().tobytes(), b"between"]
        parts += [rows["scale"].numpy().tobytes(), b"after"]
    if kind != "float32":
        (tmp_path / "decoder.onnx").write_bytes(b"".join(parts) if precision.endswith("decoder") else b"no values")
    in_decoder = write_embeddings(weight, kind, tmp_path, tmp_path / "source")
    assert (in_decoder is not None) == precision.endswith("decoder")
    file = tmp_path / ("decoder.onnx" if in_decoder else "embeddings.safetensors")
    manifest = {
        "model": {"vocab_size": vocab, "hidden_size": hidden},
        "embeddings": kind,
        "int4_embeddings": in_decoder if kind == "int4" else None,
        "int8_embeddings": in_decoder if kind == "int8" else None,
    }
    if kind == "int4" and in_decoder is None:
        manifest["int4_embeddings"] = {"block_size": INT4_BLOCK_SIZE}
    ids = [0, 7, vocab - 1]
    answer = oracle(
        {"op": "embeddings", "bytes": b64(np.frombuffer(file.read_bytes(), np.uint8)), "manifest": manifest, "ids": ids}
    )
    got = np.frombuffer(base64.b64decode(answer["values"]), np.float32).reshape(len(ids), hidden)
    if kind == "int8":
        stored = quantize_rows(weight)
        weight = stored["weight"].float() * stored["scale"].unsqueeze(1)
    assert np.array_equal(got, weight[ids].numpy())
