"""Rows of different prefix lengths in one batch (an image prefix plus each image's own prompt, as
retrieval gives them): the engine on GPT-2 and Llama-family decoders, and the HF `generate`
fallback, decode such a batch at once and give every row the tokens it gets decoded alone.

The rows are right-padded with large noise (`helpers_engine.ragged_prefixes`), so a row that read
its padding, or ran at another row's positions, would change its tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixcap.engine import DecodeSpec, backends, ragged
from prefixcap.engine.backends import HFGenerateBackend
from prefixcap.engine.gpt2 import GPT2Forward
from prefixcap.engine.runner import DecodeRunner
from prefixcap.options import GenerationOptions
from prefixcap.testing import build_decoder
from tests.helpers_engine import (
    PAD,
    RAGGED,
    assert_rows_decode_as_alone,
    engine,
    ragged_prefixes,
    stop_ids_seen_in,
)
from tests.test_engine import tiny_gpt2

SEARCHES = {"greedy": ({}, 1), "beam": ({"num_beams": 4, "num_return_sequences": 2}, 2)}  # options, rows per input
STOPS = [(0, 2), (1, 5), (3, 8)]  # (row, step) of the tokens that stop rows, so that rows end apart


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {family: build_decoder(root / family, family) for family in ("llama", "qwen3")}


@pytest.fixture(scope="module")
def decoders(decoder_dirs: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """GPT-2 (learned positions), Llama (rotary positions, grouped-query attention) and Qwen3
    (per-head norms), the latter two loaded as users' decoders are."""
    loaded = {family: AutoModelForCausalLM.from_pretrained(path).eval() for family, path in decoder_dirs.items()}
    return {"gpt2": tiny_gpt2(), **loaded}


def engine_decode(decoder: torch.nn.Module, stop_ids: list[int], options: dict):
    return lambda prefix, lengths: engine(decoder, prefix, stop_ids, lengths=lengths, max_new_tokens=12, **options)


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_the_engine_decodes_rows_of_different_lengths_as_alone(decoders, family, search):
    decoder, (options, per_input) = decoders[family], SEARCHES[search]
    prefix = ragged_prefixes(RAGGED, seed=1)
    stop_ids = stop_ids_seen_in(decoder, prefix, STOPS, lengths=RAGGED)
    assert_rows_decode_as_alone(engine_decode(decoder, stop_ids, options), prefix, RAGGED, per_input)


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_generate_decodes_rows_of_different_lengths_as_alone(decoders, family, search):
    """Decoders the engine does not run: left padding, an attention mask, positions from the mask."""
    decoder, (options, per_input) = decoders[family], SEARCHES[search]
    prefix = ragged_prefixes(RAGGED, seed=2)
    stop_ids = stop_ids_seen_in(decoder, prefix, STOPS, lengths=RAGGED)
    spec = DecodeSpec.of(GenerationOptions(max_new_tokens=12, **options), eos_token_ids=stop_ids, pad_token_id=PAD)
    backend = HFGenerateBackend(decoder, "HF generate (the test's choice)")
    assert_rows_decode_as_alone(lambda p, lengths: backend.generate(p, spec, lengths), prefix, RAGGED, per_input)
    # and the engine gives the same tokens
    assert torch.equal(
        backend.generate(prefix, spec, torch.tensor(RAGGED)), engine_decode(decoder, stop_ids, options)(prefix, RAGGED)
    )


def test_the_backends_generate_passes_the_lengths_on(decoders, monkeypatch):
    decoder = decoders["llama"]
    prefix = ragged_prefixes(RAGGED, seed=3)
    stop_ids = stop_ids_seen_in(decoder, prefix, STOPS, lengths=RAGGED)
    spec = DecodeSpec.of(GenerationOptions(max_new_tokens=12), eos_token_ids=stop_ids, pad_token_id=PAD)
    expected = engine_decode(decoder, stop_ids, {})(prefix, RAGGED)
    assert torch.equal(backends.generate(decoder, prefix, spec, RAGGED), expected)
    monkeypatch.setattr(backends, "choose_backend", lambda decoder, positions=None: HFGenerateBackend(decoder, "HF"))
    assert torch.equal(backends.generate(decoder, prefix, spec, RAGGED), expected)


def test_rows_of_equal_length_take_the_path_without_a_mask(decoders, monkeypatch):
    """Lengths that are all the prefix's are no ragged batch: no mask, no per-row positions."""
    decoder = decoders["gpt2"]
    prefix = ragged_prefixes([5] * 4, seed=4)
    expected = engine(decoder, prefix, [PAD], max_new_tokens=8)

    def no_mask(*args):
        raise AssertionError("a key mask for rows of equal length")

    monkeypatch.setattr("prefixcap.engine.gpt2.key_mask", no_mask)
    assert torch.equal(engine(decoder, prefix, [PAD], lengths=[5] * 4, max_new_tokens=8), expected)
    # rows shorter than the prefix but equal are cropped to the equal path too
    assert torch.equal(
        engine(decoder, prefix, [PAD], lengths=[3] * 4, max_new_tokens=8),
        engine(decoder, prefix[:, :3], [PAD], max_new_tokens=8),
    )


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        ([5, 0, 5], "within 1..5"),
        ([5, 6, 5], "within 1..5"),
        ([5, 5], "one length per row"),
        ([[5, 5, 5]], "one length"),
    ],
)
def test_lengths_are_checked(lengths, message):
    with pytest.raises(ValueError, match=message):
        ragged.check_lengths(torch.zeros(3, 5, 8), lengths)


def test_a_ragged_runner_reused_with_other_lengths_decodes_them(decoders):
    """Runners keep lengths in buffers (what captured CUDA graphs replay): a second decode with
    other lengths equals a fresh runner's."""
    model = decoders["gpt2"]
    spec = DecodeSpec.of(GenerationOptions(max_new_tokens=10, num_beams=3), eos_token_ids=[PAD], pad_token_id=PAD)
    prefix = ragged_prefixes(RAGGED, seed=5)
    runner = DecodeRunner(GPT2Forward(model), spec, batch=len(RAGGED), prefix_length=max(RAGGED), ragged=True)
    runner.run(prefix, lengths=torch.tensor(RAGGED))
    other = torch.tensor([2, 5, 1, 3, 4])
    fresh = DecodeRunner(GPT2Forward(model), spec, batch=len(RAGGED), prefix_length=max(RAGGED), ragged=True)
    assert torch.equal(runner.run(prefix, lengths=other), fresh.run(prefix, lengths=other))


# ---------------------------------------------------------------------- CUDA graphs
@pytest.mark.cuda
@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cuda_graphs_decode_rows_of_different_lengths_as_alone(decoder_dirs, family, search):
    """The lengths live in the captured runner's buffers: replays with other lengths (and fewer
    rows than captured) equal eager decoding, and each row equals itself decoded alone."""
    options, per_input = SEARCHES[search]
    if family == "gpt2":
        decoder = tiny_gpt2("cuda")
    else:
        decoder = AutoModelForCausalLM.from_pretrained(decoder_dirs[family]).eval().to("cuda")
    prefix = ragged_prefixes(RAGGED, seed=6, device="cuda")
    stop_ids = stop_ids_seen_in(decoder, prefix, STOPS, lengths=RAGGED)
    graphed = engine_decode(decoder, stop_ids, options)
    assert_rows_decode_as_alone(graphed, prefix, RAGGED, per_input)
    for lengths in ([2, 5, 1, 3, 4], [3, 1, 2]):
        rows = prefix[: len(lengths)]
        eager = engine(decoder, rows, stop_ids, lengths=lengths, cuda_graphs=False, max_new_tokens=12, **options)
        assert torch.equal(graphed(rows, lengths), eager)
