"""Token selection for greedy decoding, sampling and beam search, as fixed-shape tensor updates.

A search object owns all of its state in preallocated tensors and updates them in place, one
`select(step, logits)` per decoding step. Finished rows keep their place (masked, not removed), so
every step has the same shapes and no step ever reads a value back to the host: the runner can
replay the steps as CUDA graphs and ask `all_finished()` only every few steps.
"""

from __future__ import annotations

import torch

from prefixcap.engine.processors import process_logits
from prefixcap.engine.spec import DecodeSpec


def is_stop(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Elementwise: is the token one of `stop_ids`? (a broadcast compare, graph-safe)"""
    return (tokens.unsqueeze(-1) == stop_ids).any(dim=-1)


class GreedySearch:
    """One token per row per step: the argmax, or a sample when the options ask for sampling.

    Sampling draws with the exponential race (argmax of p / Exp(1) noise), which picks token i with
    probability p_i like `torch.multinomial`, but without a host sync, from `generator`.
    """

    def __init__(self, spec: DecodeSpec, rows: int, device: torch.device, generator: torch.Generator | None = None):
        self.spec, self.options = spec, spec.options
        self.generator = generator
        self.stop_ids = torch.tensor(spec.stop_token_ids, device=device)
        self.tokens = torch.empty((rows, self.options.max_new_tokens), dtype=torch.long, device=device)
        self.finished = torch.empty(rows, dtype=torch.bool, device=device)
        self.lengths = torch.empty(rows, dtype=torch.long, device=device)  # tokens kept per row
        self.reset(rows // spec.rows_per_input)

    def reset(self, inputs: int) -> None:
        """Start a decode of the first `inputs` inputs; the remaining rows are padding."""
        self.active_rows = inputs * self.spec.rows_per_input
        self.tokens.fill_(self.spec.pad_token_id)
        self.finished.fill_(False)
        self.finished[self.active_rows :] = True
        self.lengths.zero_()

    def select(self, step: int, logits: torch.Tensor) -> None:
        """Choose token `step` of every row from its next-token `logits` [rows, V]."""
        if self.spec.processes_logits:
            # HF processes float32 logits. Rules that only ban tokens (-inf) and the argmax give the
            # same result on the model's dtype, whose cast to float32 is exact and order-preserving:
            # only rescaling rules pay for a float32 copy of the [rows, V] logits at every step.
            scores = logits.float() if self.spec.rescales_logits else logits
            logits = process_logits(scores, self.tokens[:, :step], step, self.options, self.stop_ids)
        if self.options.do_sample:
            probs = logits.softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            chosen = (probs / noise).argmax(dim=-1)
        else:
            chosen = logits.argmax(dim=-1)
        self.lengths += ~self.finished
        self.tokens[:, step] = chosen.masked_fill(self.finished, self.spec.pad_token_id)
        self.finished |= is_stop(chosen, self.stop_ids)

    def next_input(self, step: int) -> torch.Tensor:
        """The tokens [rows] to feed after `select(step)`: the ones just chosen."""
        return self.tokens[:, step]

    def all_finished(self) -> torch.Tensor:
        return self.finished.all()

    def result(self) -> torch.Tensor:
        """[rows, T] tokens, cropped to the longest row (like HF, which stops once all are done)."""
        tokens = self.tokens[: self.active_rows]
        return tokens[:, : int(self.lengths[: self.active_rows].max())].clone()


class BeamSearch:
    """Batched beam search with the semantics of Hugging Face `generate(num_beams=...)` (the
    vectorised implementation of transformers >= 4.50):

    - each step keeps the top `max(2, 1 + n_stop) * num_beams` continuations of all beams by summed
      log-prob (after the logits rules, which see log-probs);
    - a continuation ending in a stop token, and ranked within the top `num_beams`, becomes a
      finished hypothesis scored `sum_logprobs / length ** length_penalty` (length counts the stop
      token); at `max_new_tokens` every top continuation finishes;
    - the best `num_beams` non-finished continuations keep running;
    - an input takes no more hypotheses once it has `num_beams` of them and either
      `early_stopping=True`, or the best running beam, scored at its current length, cannot beat the
      worst finished one (HF's heuristic for `early_stopping=False`);
    - the result is the `num_return_sequences` best finished hypotheses, best first.
    """

    def __init__(self, spec: DecodeSpec, batch: int, device: torch.device):
        self.spec, self.options = spec, spec.options
        self.batch = batch
        beams, steps = self.options.num_beams, self.options.max_new_tokens
        self.candidates = max(2, 1 + len(spec.stop_token_ids)) * beams
        self.stop_ids = torch.tensor(spec.stop_token_ids, device=device)
        self.in_top_beams = torch.arange(self.candidates, device=device) < beams  # candidate ranks
        self.row_offsets = torch.arange(batch, device=device).unsqueeze(1) * beams
        # running beams
        self.tokens = torch.empty((batch, beams, steps), dtype=torch.long, device=device)
        self.scores = torch.empty((batch, beams), dtype=torch.float32, device=device)
        self.parents = torch.empty(batch * beams, dtype=torch.long, device=device)  # cache row of each beam
        # finished hypotheses, best first
        self.done_tokens = torch.empty_like(self.tokens)
        self.done_scores = torch.empty_like(self.scores)
        self.done_lengths = torch.empty((batch, beams), dtype=torch.long, device=device)
        self.done_valid = torch.empty((batch, beams), dtype=torch.bool, device=device)
        self.open = torch.empty(batch, dtype=torch.bool, device=device)  # can still take hypotheses
        self.reset(batch)

    def reset(self, inputs: int) -> None:
        """Start a decode of the first `inputs` inputs; the remaining ones are padding."""
        self.inputs = inputs
        self.tokens.fill_(self.spec.pad_token_id)
        self.scores.fill_(-float("inf"))
        self.scores[:, 0] = 0.0  # all beams start equal: expand the first one only
        self.parents.copy_(torch.arange(self.parents.numel(), device=self.parents.device))
        self.done_tokens.fill_(self.spec.pad_token_id)
        self.done_scores.fill_(-float("inf"))
        self.done_lengths.zero_()
        self.done_valid.fill_(False)
        self.open.fill_(True)
        self.open[inputs:] = False

    def select(self, step: int, logits: torch.Tensor) -> None:
        """Advance every beam by token `step`, given next-token `logits` [batch * beams, V]. Sets
        `parents`: the cache row each new beam continues."""
        options, beams, vocab = self.options, self.options.num_beams, logits.shape[-1]
        history = self.tokens.view(-1, options.max_new_tokens)[:, :step]
        log_probs = process_logits(logits.float().log_softmax(dim=-1), history, step, options, self.stop_ids)
        totals = (log_probs.view(self.batch, beams, vocab) + self.scores.unsqueeze(-1)).view(self.batch, -1)

        # 1. the top continuations of all beams of each input
        cand_scores, flat = totals.topk(self.candidates, dim=-1)
        cand_beams, cand_tokens = flat // vocab, flat % vocab
        cand_seqs = self.tokens.gather(1, cand_beams.unsqueeze(-1).expand(-1, -1, options.max_new_tokens))
        cand_seqs[:, :, step] = cand_tokens
        ends = is_stop(cand_tokens, self.stop_ids)
        if step == options.max_new_tokens - 1:
            ends.fill_(True)

        # 2. finished candidates join the hypotheses if they rank among the best `beams`
        full = self.done_valid.all(dim=-1)
        accepting = self.open & ~(full & options.early_stopping)
        joins = ends & self.in_top_beams & accepting.unsqueeze(1)
        final = torch.where(joins, cand_scores / (step + 1) ** options.length_penalty, -float("inf"))
        merged_scores, keep = torch.cat((self.done_scores, final), dim=1).topk(beams, dim=-1)
        merged_tokens = torch.cat((self.done_tokens, cand_seqs), dim=1)
        merged_lengths = torch.cat((self.done_lengths, torch.full_like(cand_beams, step + 1)), dim=1)
        self.done_scores.copy_(merged_scores)
        self.done_tokens.copy_(merged_tokens.gather(1, _expand(keep, merged_tokens)))
        self.done_lengths.copy_(merged_lengths.gather(1, keep))
        self.done_valid.copy_(torch.cat((self.done_valid, joins), dim=1).gather(1, keep))

        # 3. the best unfinished candidates run on
        running = cand_scores.masked_fill(ends, -float("inf"))
        run_scores, pick = running.topk(beams, dim=-1)
        self.scores.copy_(run_scores)
        self.tokens.copy_(cand_seqs.gather(1, _expand(pick, cand_seqs)))
        self.parents.copy_((cand_beams.gather(1, pick) + self.row_offsets).view(-1))

        # 4. can the best running beam still beat the worst hypothesis? (HF's heuristic)
        best_running = self.scores[:, 0] / (step + 1) ** options.length_penalty
        worst_done = self.done_scores.min(dim=-1).values
        self.open &= ~self.done_valid.all(dim=-1) | (best_running > worst_done)

    def next_input(self, step: int) -> torch.Tensor:
        """The tokens [batch * beams] to feed after `select(step)`."""
        return self.tokens[:, :, step].reshape(-1)

    def all_finished(self) -> torch.Tensor:
        full = self.done_valid.all(dim=-1)
        return (~self.open | (full & self.options.early_stopping)).all()

    def result(self) -> torch.Tensor:
        """The best `num_return_sequences` hypotheses per input, [batch * n, T], best first."""
        n = self.options.num_return_sequences
        length = int(self.done_lengths[: self.inputs, :n].max())
        return self.done_tokens[: self.inputs, :n, :length].reshape(self.inputs * n, length).clone()


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[batch, k] beam indices -> [batch, k, T] for gathering whole sequences."""
    return index.unsqueeze(-1).expand(-1, -1, like.shape[-1])
