"""The decoding engine against references: a full-recompute loop, and HF `generate`.

Tiny GPT-2s with random weights; a wide initialisation makes their outputs vary from step to
step, so stop tokens land at different positions in different rows.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from prefixcap.engine.gpt2 import GPT2Forward
from prefixcap.engine.processors import keep_top_k, keep_top_p
from prefixcap.engine.runner import DecodeRunner
from prefixcap.engine.spec import DecodeSpec
from prefixcap.options import GenerationOptions
from tests.helpers_engine import (
    PAD,
    PREFIX,
    engine,
    full_recompute_greedy,
    hf_generate,
    prefixes,
    stop_ids_seen_in,
    supported,
)

VOCAB, WIDTH = 300, 64


def tiny_gpt2(device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=WIDTH, n_head=4, vocab_size=VOCAB, n_positions=64, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0, **overrides,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval().to(device, dtype)


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    return tiny_gpt2()


def test_supports_plain_gpt2_only(model):
    assert supported(model)
    variant = tiny_gpt2(scale_attn_by_inverse_layer_idx=True)
    assert not supported(variant)
    with pytest.raises(ValueError, match="cannot run GPT2LMHeadModel: scale_attn_by_inverse_layer_idx=True"):
        engine(variant, prefixes(1), [0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_full_recompute(model, seed):
    prefix = prefixes(6, seed)
    stop_ids = stop_ids_seen_in(model, prefix, [(0, 2), (3, 7)])
    expected = full_recompute_greedy(model, prefix, 14, stop_ids)
    assert torch.equal(engine(model, prefix, stop_ids, max_new_tokens=14), expected)


@pytest.mark.parametrize(
    "length_penalty, early_stopping, num_return_sequences",
    [(1.0, True, 1), (1.0, False, 2), (2.0, False, 3), (0.5, True, 4), (-1.0, False, 2)],
)
def test_beam_equals_hf(model, length_penalty, early_stopping, num_return_sequences):
    prefix = prefixes(5, seed=3)
    stop_ids = stop_ids_seen_in(model, prefix, [(0, 3), (1, 5), (4, 1)])
    options = dict(
        max_new_tokens=12, num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping,
        num_return_sequences=num_return_sequences,
    )  # fmt: skip
    assert torch.equal(engine(model, prefix, stop_ids, **options), hf_generate(model, prefix, stop_ids, **options))


@pytest.mark.filterwarnings("ignore:Passing `:UserWarning")  # HF: rules apply to generated tokens only
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize(
    "rule",
    [{"repetition_penalty": 1.5}, {"repetition_penalty": 0.7}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 6}],
)
def test_logits_rules_equal_hf(model, num_beams, rule):
    prefix = prefixes(4, seed=4)
    stop_ids = stop_ids_seen_in(model, prefix, [(0, 1), (2, 3)])
    options = dict(max_new_tokens=12, num_beams=num_beams, **rule)
    ours = engine(model, prefix, stop_ids, **options)
    assert torch.equal(ours, hf_generate(model, prefix, stop_ids, **options))
    assert not torch.equal(ours, engine(model, prefix, stop_ids, max_new_tokens=12, num_beams=num_beams))


@pytest.mark.parametrize("rule", [{"min_new_tokens": 6}, {"no_repeat_ngram_size": 1}])
def test_banning_rules_on_bf16_logits_equal_float32_scores(rule, monkeypatch):
    """Greedy applies token bans to the model's bf16 logits without HF's float32 copy; forcing the
    float32 path must give the same tokens (the cast is exact and keeps the order)."""
    model = tiny_gpt2(dtype=torch.bfloat16)
    prefix = prefixes(6, seed=16, dtype=torch.bfloat16)
    stop_ids = stop_ids_seen_in(model, prefix, [(0, 1), (3, 2)])
    options = dict(max_new_tokens=12, **rule)
    direct = engine(model, prefix, stop_ids, **options)
    monkeypatch.setattr(DecodeSpec, "rescales_logits", property(lambda spec: True))
    assert torch.equal(direct, engine(model, prefix, stop_ids, **options))
    assert not torch.equal(direct, engine(model, prefix, stop_ids, max_new_tokens=12))  # the rule acted


def test_a_reused_runner_does_not_overwrite_earlier_results(model):
    """Graphed runners are cached and reused: results must not be views of their buffers."""
    options = GenerationOptions(max_new_tokens=8, num_beams=3)
    spec = DecodeSpec.of(options, eos_token_ids=[0], pad_token_id=PAD)
    runner = DecodeRunner(GPT2Forward(model), spec, batch=1, prefix_length=PREFIX)
    first = runner.run(prefixes(1, seed=17))
    kept = first.clone()
    second = runner.run(prefixes(1, seed=18))
    assert torch.equal(first, kept) and not torch.equal(first, second)


def test_decoding_ignores_a_callers_autocast(model):
    """Training validation decodes under autocast; the engine runs in the decoder's own dtype."""
    prefix = prefixes(16, seed=19)
    plain = engine(model, prefix, [VOCAB - 1], max_new_tokens=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(engine(model, prefix, [VOCAB - 1], max_new_tokens=20), plain)


def test_min_new_tokens_holds_back_stop_tokens(model):
    prefix = prefixes(4, seed=5)
    stop_ids = stop_ids_seen_in(model, prefix, [(0, 0), (1, 1), (2, 2)])
    tokens = engine(model, prefix, stop_ids, max_new_tokens=10, min_new_tokens=5)
    early = torch.isin(tokens[:, :5], torch.tensor(stop_ids))
    assert not early.any()
    assert torch.isin(engine(model, prefix, stop_ids, max_new_tokens=10)[:, :5], torch.tensor(stop_ids)).any()


def test_rows_stop_at_eos_or_stop_token_and_are_padded(model):
    prefix = prefixes(6, seed=6)
    eos, stop = stop_ids_seen_in(model, prefix, [(0, 2)])[0], stop_ids_seen_in(model, prefix, [(3, 4)])[0]
    tokens = engine(model, prefix, [eos, stop], max_new_tokens=12)
    ended = 0
    for row in tokens.tolist():
        ends = [i for i, token in enumerate(row) if token in (eos, stop)]
        if ends:  # the stop token is kept, then only padding follows
            ended += 1
            assert all(token == PAD for token in row[ends[0] + 1 :])
    assert ended >= 2 and tokens.shape[1] <= 12


@pytest.mark.parametrize("num_beams", [1, 4])
def test_rows_in_a_batch_equal_rows_alone(model, num_beams):
    prefix = prefixes(6, seed=7)
    stop_ids = stop_ids_seen_in(model, prefix, [(0, 1), (2, 4), (5, 8)])
    options = dict(max_new_tokens=12, num_beams=num_beams)
    batched = engine(model, prefix, stop_ids, **options)
    lengths = set()
    for i in range(prefix.shape[0]):
        alone = engine(model, prefix[i : i + 1], stop_ids, **options)[0]
        lengths.add(len(alone))
        assert torch.equal(batched[i, : len(alone)], alone)
        assert (batched[i, len(alone) :] == PAD).all()
    assert len(lengths) > 1  # the rows really had different lengths


def test_sampling_is_reproducible_with_a_seed(model):
    prefix = prefixes(4, seed=8)
    options = dict(max_new_tokens=10, do_sample=True, top_k=50, top_p=0.95, temperature=1.3)
    first = engine(model, prefix, [VOCAB - 1], seed=7, **options)
    assert torch.equal(first, engine(model, prefix, [VOCAB - 1], seed=7, **options))
    assert not torch.equal(first, engine(model, prefix, [VOCAB - 1], seed=8, **options))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("options", [dict(num_beams=4), dict(do_sample=True, temperature=0.8, seed=0)])
def test_num_return_sequences_are_distinct(model, batch, options):
    tokens = engine(model, prefixes(batch, seed=9), [VOCAB - 1], max_new_tokens=10, num_return_sequences=4, **options)
    assert tokens.shape[0] == batch * 4
    for group in tokens.view(batch, 4, -1):
        assert len({tuple(row.tolist()) for row in group}) == 4


def test_sampling_with_one_candidate_is_greedy(model):
    prefix = prefixes(4, seed=10)
    greedy = engine(model, prefix, [VOCAB - 1], max_new_tokens=10)
    assert torch.equal(engine(model, prefix, [VOCAB - 1], max_new_tokens=10, do_sample=True, top_k=1), greedy)
    assert torch.equal(engine(model, prefix, [VOCAB - 1], max_new_tokens=10, do_sample=True, top_p=1e-6), greedy)


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (7, 1.0), (0, 0.5), (0, 0.9), (20, 0.8)])
def test_filters_equal_hf_warpers(top_k, top_p):
    scores = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(top_k)) * 3
    expected = TemperatureLogitsWarper(0.7)(None, scores.clone())
    ours = expected.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
        keep_top_k(ours, top_k)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
        keep_top_p(ours, top_p)
    assert torch.equal(ours, expected)


def test_prefix_plus_new_tokens_must_fit_the_positions(model):
    with pytest.raises(ValueError, match="exceeds the decoder's 64 positions"):
        engine(model, prefixes(1), [0], max_new_tokens=61)


# ---------------------------------------------------------------------- CUDA graphs
@pytest.mark.cuda
@pytest.mark.parametrize("options", [dict(), dict(num_beams=4, num_return_sequences=2), dict(no_repeat_ngram_size=2)])
def test_cuda_graphs_equal_eager_in_bf16(options):
    model = tiny_gpt2("cuda", torch.bfloat16)
    prefix = prefixes(6, seed=11, device="cuda", dtype=torch.bfloat16)
    eager = engine(model, prefix, [3, 5], cuda_graphs=False, max_new_tokens=16, **options)
    graphed = engine(model, prefix, [3, 5], max_new_tokens=16, **options)
    assert torch.equal(graphed, eager)


@pytest.mark.cuda
def test_cuda_greedy_equals_full_recompute_and_beam_equals_hf():
    model = tiny_gpt2("cuda")
    prefix = prefixes(6, seed=12, device="cuda")
    stop_ids = stop_ids_seen_in(model, prefix, [(0, 2), (3, 6)])
    assert torch.equal(
        engine(model, prefix, stop_ids, max_new_tokens=14), full_recompute_greedy(model, prefix, 14, stop_ids)
    )
    options = dict(max_new_tokens=12, num_beams=4, num_return_sequences=2, early_stopping=False)
    assert torch.equal(engine(model, prefix, stop_ids, **options), hf_generate(model, prefix, stop_ids, **options))


@pytest.mark.cuda
def test_cuda_graphed_runner_serves_smaller_batches():
    """A batch of 3 replays the graphs captured for 4 (padded); results match eager decoding."""
    model = tiny_gpt2("cuda")
    prefix = prefixes(4, seed=13, device="cuda")
    stop_ids = stop_ids_seen_in(model, prefix, [(0, 2), (2, 5)])
    for batch in (4, 3, 1):
        eager = engine(model, prefix[:batch], stop_ids, cuda_graphs=False, max_new_tokens=12)
        assert torch.equal(engine(model, prefix[:batch], stop_ids, max_new_tokens=12), eager)


@pytest.mark.cuda
def test_cuda_graphed_sampling_is_reproducible():
    model = tiny_gpt2("cuda", torch.bfloat16)
    prefix = prefixes(8, seed=14, device="cuda", dtype=torch.bfloat16)
    options = dict(max_new_tokens=12, do_sample=True, top_p=0.9, num_return_sequences=3)
    first = engine(model, prefix, [VOCAB - 1], seed=1, **options)
    assert torch.equal(first, engine(model, prefix, [VOCAB - 1], seed=1, **options))
    assert not torch.equal(first, engine(model, prefix, [VOCAB - 1], seed=2, **options))


@pytest.mark.cuda
def test_cuda_compiled_blocks_equal_full_recompute():
    model = tiny_gpt2("cuda")
    prefix = prefixes(4, seed=15, device="cuda")
    stop_ids = stop_ids_seen_in(model, prefix, [(0, 2)])
    compiled = engine(model, prefix, stop_ids, compile_blocks=True, max_new_tokens=12)
    assert torch.equal(compiled, full_recompute_greedy(model, prefix, 12, stop_ids))
