"""Shared by the decoding-engine tests (GPT-2 and the Llama family): random prefixes, the engine
and HF `generate` called with the same options, a full-recompute greedy reference, stop tokens
chosen so that rows end at different steps, and batches whose rows differ in length."""

from __future__ import annotations

import dataclasses

import torch

from prefixcap import engine as decoding_engine
from prefixcap.engine import DecodeSpec
from prefixcap.engine.backends import HFGenerateBackend
from prefixcap.options import GenerationOptions

PREFIX = 5  # prefix positions
PAD = 1
RAGGED = [5, 2, 4, 1, 3]  # the prefix lengths of a batch whose rows differ in length (one of 1)


def prefixes(
    batch: int, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, *, width: int = 64
) -> torch.Tensor:
    """Random prefix embeddings [batch, PREFIX, width]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, PREFIX, width, generator=generator).to(device, dtype)


def engine(
    model, prefix, stop_ids, *, lengths=None, cuda_graphs: bool = True, compile_blocks: bool = False, **options
) -> torch.Tensor:
    """The engine's tokens for `GenerationOptions(**options)` (`lengths`: ragged rows, right-padded)."""
    spec = DecodeSpec.of(GenerationOptions(**options), eos_token_ids=stop_ids, pad_token_id=PAD)
    return decoding_engine.generate(
        model, prefix, spec, lengths=lengths, cuda_graphs=cuda_graphs, compile_blocks=compile_blocks
    )


def hf_generate_only(decoder, positions=None) -> HFGenerateBackend:
    """A `choose_backend` that sends every decoder to HF generate: patched in by tests that compare
    the engine's tokens with HF generate's on the same model."""
    return HFGenerateBackend(decoder, "HF generate (the test's choice)")


def supported(decoder) -> bool:
    """Whether the engine decodes `decoder` (its family is known and its config reproduced)."""
    family, reason = decoding_engine.engine_support(decoder)
    return family is not None and reason is None


@torch.no_grad()
def hf_generate(model, prefix, stop_ids, **options) -> torch.Tensor:
    """HF `generate` with the same options, defaults included (greedy or beam search)."""
    hf_options = dataclasses.asdict(GenerationOptions(**options))
    for sampling_only in ("seed", "temperature", "top_k", "top_p"):
        del hf_options[sampling_only]
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    return model.generate(
        inputs_embeds=prefix, attention_mask=mask, eos_token_id=stop_ids, pad_token_id=PAD, **hf_options
    )


@torch.no_grad()
def full_recompute_greedy(model, prefix, steps: int, stop_ids: list[int]) -> torch.Tensor:
    """ClipCap's loop: run the whole sequence at every step, take the argmax, append; then keep
    each row up to its first stop token and pad the rest."""
    sequence, tokens = prefix, []
    embedding = model.get_input_embeddings()
    for _ in range(steps):
        token = model(inputs_embeds=sequence).logits[:, -1].argmax(dim=-1)
        tokens.append(token)
        sequence = torch.cat([sequence, embedding(token).unsqueeze(1)], dim=1)
    tokens = torch.stack(tokens, dim=1)
    stops = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))
    after_stop = (stops.cumsum(dim=1) - stops.long()) > 0
    tokens = tokens.masked_fill(after_stop, PAD)
    length = int((~after_stop).sum(dim=1).max())
    return tokens[:, :length]


def stop_ids_seen_in(model, prefix, positions: list[tuple[int, int]], lengths: list[int] | None = None) -> list[int]:
    """Stop tokens that greedy decoding emits at the given (row, step) positions, so that rows
    end at different lengths (`lengths`: each row's prefix length, the rest is padding)."""
    never = model.config.vocab_size  # out of the vocabulary: no row stops
    if lengths is None:
        free = full_recompute_greedy(model, prefix, 16, stop_ids=[never])
        return sorted({int(free[row, step]) for row, step in positions})
    rows = [full_recompute_greedy(model, prefix[row : row + 1, : lengths[row]], 16, [never])[0] for row, _ in positions]
    return sorted({int(tokens[step]) for tokens, (_, step) in zip(rows, positions)})


def ragged_prefixes(
    lengths: list[int], seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, *, width: int = 64
) -> torch.Tensor:
    """Random prefix embeddings [len(lengths), max(lengths), width] whose rows are right-padded
    with large noise past their length: decoding must never read it."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randn(len(lengths), max(lengths), width, generator=generator)
    padding = torch.arange(max(lengths)).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)
    prefix[padding] = 10 * torch.randn(int(padding.sum()), width, generator=generator)
    return prefix.to(device, dtype)


def assert_rows_decode_as_alone(decode, prefix: torch.Tensor, lengths: list[int], per_input: int = 1) -> None:
    """`decode(prefix, lengths)` (lengths None: rows of equal length) gives each row of a ragged
    batch the tokens it gets decoded alone (`per_input` rows each), padded after them; the rows
    end at different steps, so that stopping is checked too."""
    batched = decode(prefix, lengths)
    assert batched.shape[0] == len(lengths) * per_input
    ends = set()
    for row, length in enumerate(lengths):
        alone = decode(prefix[row : row + 1, :length], None)
        got = batched[row * per_input : (row + 1) * per_input]
        assert torch.equal(got[:, : alone.shape[1]], alone), f"row {row} (length {length})"
        assert (got[:, alone.shape[1] :] == PAD).all()
        ends.add(alone.shape[1])
    assert len(ends) > 1  # the rows really ended at different steps
