"""The decoding engine on Llama-family decoders (Llama 3, SmolLM2, Qwen2, Qwen3, Mistral) against a
full-recompute loop and HF `generate`; the path description; int8; captioning end to end.

The decoders are the tiny random ones of `prefixcap.testing.build_decoder`, saved and loaded
through `from_pretrained` as users' models are: grouped-query attention, llama3 RoPE scaling
(llama), tied embeddings (smollm2, qwen2), q/k/v biases (qwen2), per-head norms with
head_dim != hidden / heads (qwen3), a sliding window (mistral).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

from prefixcap import CaptionModel
from prefixcap.engine import DecodeSpec, backends
from prefixcap.engine.backends import EngineBackend, HFGenerateBackend, choose_backend
from prefixcap.options import GenerationOptions
from prefixcap.system.hardware import quantize_int8
from prefixcap.testing import build_decoder
from tests.helpers_engine import PAD, full_recompute_greedy, hf_generate, prefixes, stop_ids_seen_in, supported
from tests.helpers_engine import engine as run_engine
from tests.reference import naive_greedy, strip_padding

FAMILIES = ["llama", "smollm2", "qwen2", "qwen3", "mistral"]
WIDTH = 64  # hidden size of the tiny decoders


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {family: build_decoder(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def decoders(decoder_dirs: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {family: AutoModelForCausalLM.from_pretrained(path).eval() for family, path in decoder_dirs.items()}


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, **overrides,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------- which path
@pytest.mark.parametrize("family", FAMILIES)
def test_the_engine_runs_every_family(decoders, family):
    decoder = decoders[family]
    assert supported(decoder)
    assert choose_backend(decoder).description == f"prefixcap engine ({'llama' if family == 'smollm2' else family})"


def test_other_decoders_are_described_and_refused():
    torch.manual_seed(0)
    phi = PhiForCausalLM(
        PhiConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    assert not supported(phi)
    assert choose_backend(phi).description == "HF generate (PhiForCausalLM: not supported by the engine)"
    with pytest.raises(ValueError, match="cannot run PhiForCausalLM: not supported by the engine"):
        run_engine(phi, prefixes(1, width=32), [0])
    dynamic = tiny_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert choose_backend(dynamic).description == (
        "HF generate (LlamaForCausalLM: rope_type 'dynamic' recomputes its frequencies from the sequence length)"
    )


def test_generation_logs_the_path_once_per_decoder(decoders, caplog):
    decoder, prefix = decoders["qwen3"], prefixes(2, seed=1)
    options = GenerationOptions(max_new_tokens=4)
    with caplog.at_level(logging.INFO, logger="prefixcap"):
        for _ in range(2):
            backends.generate(decoder, prefix, DecodeSpec.of(options, eos_token_ids=[0], pad_token_id=PAD))
    assert [record.getMessage() for record in caplog.records] == ["generating with prefixcap engine (qwen3)"]


def test_decodes_past_a_sliding_window_go_to_hf_generate(decoders):
    """The tiny Mistral attends 64 positions back: prefix 5 + 60 new tokens fit, 5 + 70 do not."""
    mistral, prefix = decoders["mistral"], prefixes(2, seed=2)
    assert isinstance(choose_backend(mistral, 64), EngineBackend)
    assert isinstance(choose_backend(mistral, 74), HFGenerateBackend)
    assert choose_backend(mistral, 74).description == (
        "HF generate (MistralForCausalLM: 74 positions exceed its 64-position sliding window)"
    )
    with pytest.raises(ValueError, match="exceeds the 64-position sliding window of MistralForCausalLM"):
        run_engine(mistral, prefix, [mistral.config.vocab_size], max_new_tokens=70)
    never = [mistral.config.vocab_size]
    spec = DecodeSpec.of(GenerationOptions(max_new_tokens=70), eos_token_ids=never, pad_token_id=PAD)
    tokens = backends.generate(mistral, prefix, spec)
    assert torch.equal(tokens, hf_generate(mistral, prefix, never, max_new_tokens=70))
    assert torch.equal(run_engine(mistral, prefix, never, max_new_tokens=60), tokens[:, :60])


# ---------------------------------------------------------------------- the same tokens as the references
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_full_recompute_and_hf(decoders, family):
    decoder = decoders[family]
    prefix = prefixes(6, seed=3)
    stop_ids = stop_ids_seen_in(decoder, prefix, [(0, 2), (3, 7)])
    ours = run_engine(decoder, prefix, stop_ids, max_new_tokens=14)
    assert torch.equal(ours, full_recompute_greedy(decoder, prefix, 14, stop_ids))
    assert torch.equal(ours, hf_generate(decoder, prefix, stop_ids, max_new_tokens=14))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "length_penalty, early_stopping, num_return_sequences, num_beams",
    [(1.0, True, 1, 4), (2.0, False, 3, 3), (0.5, False, 2, 4)],
)
def test_beam_equals_hf(decoders, family, length_penalty, early_stopping, num_return_sequences, num_beams):
    decoder = decoders[family]
    prefix = prefixes(4, seed=4)
    stop_ids = stop_ids_seen_in(decoder, prefix, [(0, 3), (1, 5), (3, 1)])
    options = dict(
        max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
        num_return_sequences=num_return_sequences,
    )  # fmt: skip
    assert torch.equal(
        run_engine(decoder, prefix, stop_ids, **options), hf_generate(decoder, prefix, stop_ids, **options)
    )


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        {"rope_type": "proportional", "partial_rotary_factor": 0.5},
    ],  # fmt: skip
    ids=["default", "linear", "llama3", "yarn", "proportional"],
)
def test_rope_scaling_equals_hf(rope_scaling):
    decoder = tiny_llama(rope_scaling=rope_scaling)
    prefix = prefixes(4, seed=5)
    stop_ids = stop_ids_seen_in(decoder, prefix, [(0, 4), (2, 9)])
    ours = run_engine(decoder, prefix, stop_ids, max_new_tokens=24)
    assert torch.equal(ours, hf_generate(decoder, prefix, stop_ids, max_new_tokens=24))
    assert torch.equal(ours, full_recompute_greedy(decoder, prefix, 24, stop_ids))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_rows_in_a_batch_equal_rows_alone(decoders, family, num_beams):
    decoder = decoders[family]
    prefix = prefixes(5, seed=7)
    stop_ids = stop_ids_seen_in(decoder, prefix, [(0, 1), (2, 4), (4, 8)])
    options = dict(max_new_tokens=12, num_beams=num_beams)
    batched = run_engine(decoder, prefix, stop_ids, **options)
    lengths = set()
    for i in range(prefix.shape[0]):
        alone = run_engine(decoder, prefix[i : i + 1], stop_ids, **options)[0]
        lengths.add(len(alone))
        assert torch.equal(batched[i, : len(alone)], alone)
        assert (batched[i, len(alone) :] == PAD).all()
    assert len(lengths) > 1  # the rows really had different lengths


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_reproducible_with_a_seed(decoders, family):
    decoder, prefix, never = decoders[family], prefixes(4, seed=7), [decoders[family].config.vocab_size]
    options = dict(max_new_tokens=10, do_sample=True, top_k=50, top_p=0.95, temperature=1.3, num_return_sequences=2)
    first = run_engine(decoder, prefix, never, seed=7, **options)
    assert first.shape == (8, 10)
    assert torch.equal(first, run_engine(decoder, prefix, never, seed=7, **options))
    assert not torch.equal(first, run_engine(decoder, prefix, never, seed=8, **options))


def test_int8_llama_runs_on_the_engine(decoder_dirs):
    decoder = quantize_int8(AutoModelForCausalLM.from_pretrained(decoder_dirs["llama"]).eval())
    assert isinstance(decoder.model.layers[0].mlp.up_proj, torch.ao.nn.quantized.dynamic.Linear)
    assert choose_backend(decoder).description == "prefixcap engine (llama)"
    prefix = prefixes(4, seed=8)
    stop_ids = stop_ids_seen_in(decoder, prefix, [(0, 2), (3, 5)])
    for options in (dict(max_new_tokens=10), dict(max_new_tokens=10, num_beams=3)):
        assert torch.equal(
            run_engine(decoder, prefix, stop_ids, **options), hf_generate(decoder, prefix, stop_ids, **options)
        )


# ---------------------------------------------------------------------- captioning end to end
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_caption_model_with_a_llama_family_decoder_captions(tiny_components, decoder_dirs, family):
    clip_dir, _ = tiny_components
    torch.manual_seed(0)
    model = CaptionModel.from_components(clip_dir, decoder_dirs[family], mapper="mlp", prefix_length=4).eval()
    assert model.tokenizer.pad_token_id == model.tokenizer.eos_token_id  # no pad token: EOS pads
    assert model.max_new_tokens_limit == 128 - 4
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prefix = model.prefix_embeds(model.encode_pixels(pixels))
    stop_ids = model.stop_token_ids()
    assert strip_padding(model.generate(pixels=pixels, max_new_tokens=8), stop_ids) == naive_greedy(
        model.decoder, prefix, 8, stop_ids
    )
    prompt_ids = model.tokenizer.encode("a photo of", add_special_tokens=False)
    prompt_embeds = model.decoder.get_input_embeddings()(torch.tensor(prompt_ids)).expand(2, -1, -1)
    expected = naive_greedy(model.decoder, torch.cat([prefix, prompt_embeds], 1), 8, stop_ids)
    assert strip_padding(model.generate(pixels=pixels, prompt="a photo of", max_new_tokens=8), stop_ids) == expected
    captions = model.caption(pixels=pixels, max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert len(captions) == 2 and all(len(group) == 2 and all(isinstance(c, str) for c in group) for group in captions)


# ---------------------------------------------------------------------- CUDA graphs
@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [dict(), dict(num_beams=4, num_return_sequences=2)])
def test_cuda_graphs_equal_eager_in_bf16(decoder_dirs, family, options):
    decoder = AutoModelForCausalLM.from_pretrained(decoder_dirs[family]).eval().to("cuda", torch.bfloat16)
    prefix = prefixes(6, seed=9, device="cuda", dtype=torch.bfloat16)
    eager = run_engine(decoder, prefix, [3, 5], cuda_graphs=False, max_new_tokens=16, **options)
    assert torch.equal(run_engine(decoder, prefix, [3, 5], max_new_tokens=16, **options), eager)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_greedy_equals_hf_and_compiled_blocks_equal_eager(decoder_dirs, family):
    decoder = AutoModelForCausalLM.from_pretrained(decoder_dirs[family]).eval().to("cuda")
    prefix = prefixes(6, seed=10, device="cuda")
    stop_ids = stop_ids_seen_in(decoder, prefix, [(0, 2), (3, 6)])
    ours = run_engine(decoder, prefix, stop_ids, max_new_tokens=14)
    assert torch.equal(ours, hf_generate(decoder, prefix, stop_ids, max_new_tokens=14))
    compiled = run_engine(decoder, prefix, stop_ids, compile_blocks=True, max_new_tokens=14)
    assert torch.equal(compiled, ours)
