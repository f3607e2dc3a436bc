"""Logits rules applied before each token choice, in Hugging Face's order and with its semantics.

Every rule is a fixed sequence of tensor ops whose shapes depend only on the step number, never on
token values: no host synchronisation, so a whole decode step can be captured in a CUDA graph.
As in HF `generate` with `inputs_embeds`, `history` holds the generated tokens only (no prompt).
"""

from __future__ import annotations

import torch

from prefixcap.options import GenerationOptions


def process_logits(
    scores: torch.Tensor, history: torch.Tensor, step: int, options: GenerationOptions, stop_ids: torch.Tensor
) -> torch.Tensor:
    """Apply the options' rules to float `scores` [rows, V] (modified in place and returned).

    `history` [rows, step] holds each row's tokens so far. Greedy and sampling pass raw logits,
    beam search passes log-probs, exactly as HF does.
    """
    if options.repetition_penalty != 1.0 and step > 0:
        penalise_repeats(scores, history, options.repetition_penalty)
    if options.no_repeat_ngram_size > 0 and step >= options.no_repeat_ngram_size:
        ban_repeated_ngrams(scores, history, options.no_repeat_ngram_size)
    if step < options.min_new_tokens:
        scores.index_fill_(1, stop_ids, -float("inf"))
    if options.do_sample:
        if options.temperature != 1.0:
            scores.div_(options.temperature)
        if options.top_k > 0:
            keep_top_k(scores, options.top_k)
        if options.top_p < 1.0:
            keep_top_p(scores, options.top_p)
    return scores


def penalise_repeats(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> None:
    """CTRL's repetition penalty: scores of tokens already in the row are divided by `penalty`
    when positive and multiplied by it when negative (so > 1 always makes them less likely)."""
    seen = scores.gather(1, history)
    scores.scatter_(1, history, torch.where(seen < 0, seen * penalty, seen / penalty))


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Ban every token that would complete an n-gram already present in the row.

    Each earlier window of n tokens whose first n-1 tokens equal the row's last n-1 tokens bans its
    last token. `amin` makes the scatter order-independent, so duplicate windows are harmless.
    """
    windows = history.unfold(1, n, 1)  # [rows, step - n + 1, n]
    suffix = history[:, history.shape[1] - n + 1 :].unsqueeze(1)
    matches = (windows[..., :-1] == suffix).all(dim=-1)
    banned = torch.where(matches, -float("inf"), float("inf")).to(scores.dtype)
    scores.scatter_reduce_(1, windows[..., -1], banned, reduce="amin")


def keep_top_k(scores: torch.Tensor, k: int) -> None:
    """Keep the k highest scores (ties with the k-th included), as HF's TopKLogitsWarper."""
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[:, -1:]
    scores.masked_fill_(scores < kth, -float("inf"))


def keep_top_p(scores: torch.Tensor, top_p: float) -> None:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches
    `top_p` (always at least one), as HF's TopPLogitsWarper."""
    ascending, order = scores.sort(dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1.0 - top_p
    drop[:, -1] = False
    scores.masked_fill_(drop.scatter(1, order, drop), -float("inf"))
