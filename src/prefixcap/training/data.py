"""Training targets from a feature store: captions tokenised once, epoch orders that follow from
(seed, epoch) alone, and batches padded only to their own longest caption.

Every target ends with EOS, so models learn to stop; captions longer than `max_tokens` are cut
and then carry no EOS, since teaching a stop in mid-sentence would be wrong. `max_tokens` never
exceeds `limit`, the positions the decoder has left after the prefix. Labels are -100 on
padding (and CaptionModel adds -100 for the prefix), so neither counts in the loss.

A caption with a prompt (its record's, or one for the whole dataset) is stored as [prompt tokens;
caption tokens; EOS]: the model sees image + prompt and learns the caption only, as the prompt's
labels are -100 too. The caption is then tokenised after a space, as a language model continues a
prompt, and as `CaptionModel.generate` continues it at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prefixcap.data import CaptionRecord
from prefixcap.errors import UserError
from prefixcap.options import clean_prompt
from prefixcap.pipeline.features import MappedRows

COVERAGE_PERCENTILE = 99  # the default max_tokens fits this share of the training captions


@dataclass
class CaptionTargets:
    """Every (image, caption) pair of one split, as token ids ready to batch."""

    # [images, embed_dim] pooled embeddings, or [images, num_patches, embed_dim] patch tokens (memory-mapped
    # from the store: rows are read when a batch indexes them)
    embeds: torch.Tensor | MappedRows
    image_of: np.ndarray  # [captions] index of each caption's image (captions grouped by image)
    ids: np.ndarray  # [captions, prompt + max_tokens] int32 (prompt +) caption + EOS, padded with the pad id
    lengths: np.ndarray  # [captions] prompt + target lengths
    num_cut: int  # captions longer than max_tokens, cut to it
    pad_token_id: int
    max_tokens: int  # caption tokens incl. EOS, the prompt not counted
    prompt_lengths: np.ndarray | None = None  # [captions] prompt tokens at the start of each row (None: none)

    @classmethod
    def build(
        cls,
        records: Sequence[CaptionRecord],
        embeds: torch.Tensor | MappedRows,
        tokenizer,
        max_tokens: int | None = None,
        limit: int | None = None,
        prompt: str | None = None,
    ) -> CaptionTargets:
        """Tokenise every caption of `records` (whose images are the rows of `embeds`), after its
        record's prompt, or `prompt` for all (see `record_prompts`); `max_tokens=None` picks the
        length that fits COVERAGE_PERCENTILE % of the captions."""
        prompts = record_prompts(records, prompt)
        captions = [
            f" {caption}" if record_prompt else caption
            for record, record_prompt in zip(records, prompts)
            for caption in record.captions
        ]
        image_of = np.repeat(np.arange(len(records)), [len(record.captions) for record in records])
        token_ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
        prompt_ids = None
        if any(prompts):
            ids_of = {text: tokenizer.encode(text, add_special_tokens=False) if text else [] for text in set(prompts)}
            prompt_ids = [ids_of[prompts[image]] for image in image_of]
        return cls.from_token_ids(
            token_ids, image_of, embeds, tokenizer.eos_token_id, tokenizer.pad_token_id, max_tokens, limit, prompt_ids
        )

    @classmethod
    def from_token_ids(
        cls,
        token_ids: Sequence[Sequence[int]],
        image_of: np.ndarray,
        embeds: torch.Tensor | MappedRows,
        eos_token_id: int,
        pad_token_id: int,
        max_tokens: int | None = None,
        limit: int | None = None,
        prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> CaptionTargets:
        """`prompt_ids`: each caption's prompt tokens (empty: none), put before its target."""
        full_lengths = np.array([len(ids) + 1 for ids in token_ids])  # + EOS
        prompts = prompt_ids or [()] * len(token_ids)
        prompt_lengths = np.array([len(ids) for ids in prompts], dtype=np.int64)
        longest_prompt = int(prompt_lengths.max(initial=0))
        if max_tokens is None:
            max_tokens = int(np.percentile(full_lengths, COVERAGE_PERCENTILE, method="higher"))
        if limit is not None:  # a longer target would run past the decoder's position embeddings
            if longest_prompt and limit - longest_prompt < 2:
                raise UserError(
                    f"a prompt of {longest_prompt} tokens leaves no room for a caption: the decoder has "
                    f"{limit} positions after the prefix"
                )
            max_tokens = min(max_tokens, limit - longest_prompt)
        ids = np.full((len(token_ids), longest_prompt + max_tokens), pad_token_id, dtype=np.int32)
        for row, prompt, caption in zip(ids, prompts, token_ids):
            target = [*prompt, *[*caption, eos_token_id][:max_tokens]]
            row[: len(target)] = target
        lengths = prompt_lengths + np.minimum(full_lengths, max_tokens)
        num_cut = int((full_lengths > max_tokens).sum())
        prompted = prompt_lengths if longest_prompt else None
        return cls(embeds, image_of, ids, lengths, num_cut, pad_token_id, max_tokens, prompted)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_images(self) -> int:
        return self.embeds.shape[0]

    def epoch_order(self, captions_per_image: str, seed: int, epoch: int) -> np.ndarray:
        """Caption indices for one epoch, a function of (seed, epoch) only, so that a resumed run
        sees the same order. `all`: every caption once; `one`: one random caption per image."""
        rng = np.random.default_rng([seed, epoch])
        if captions_per_image == "all":
            return rng.permutation(len(self))
        first = np.searchsorted(self.image_of, np.arange(self.num_images))
        counts = np.bincount(self.image_of, minlength=self.num_images)
        chosen = first + rng.integers(0, counts)
        return chosen[rng.permutation(self.num_images)]

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """CaptionModel inputs for captions `indices`, padded to the longest of them:
        image_embeds, input_ids, attention_mask, and labels (-100 on padding and prompts)."""
        lengths = self.lengths[indices]
        width = int(lengths.max())
        input_ids = torch.from_numpy(self.ids[indices, :width].astype(np.int64))
        attention_mask = torch.from_numpy(np.arange(width) < lengths[:, None]).long()
        no_target = attention_mask == 0
        if self.prompt_lengths is not None:
            no_target |= torch.from_numpy(np.arange(width) < self.prompt_lengths[indices, None])
        return {
            "image_embeds": self.embeds[torch.from_numpy(self.image_of[indices])],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(no_target, -100),
        }


def record_prompts(records: Sequence[CaptionRecord], prompt: str | None = None) -> list[str]:
    """Each record's prompt ("" for none), or `prompt` for every record when given (`train --prompt`)."""
    if prompt is not None:
        return [clean_prompt(prompt)] * len(records)
    return [record.prompt or "" for record in records]


def trained_prompt(prompts: Sequence[str]) -> str | None:
    """The prompt a model trained on captions with these prompts should get by default at
    inference (`CaptionConfig.prompt`): the one prompt they all share, else none."""
    distinct = set(prompts)
    return distinct.pop() or None if len(distinct) == 1 else None


def process_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This process's share of an epoch: every `world_size`-th index, in batches. The order is
    first padded by repeating its start (as DistributedSampler does) so that every process gets
    the same number of batches and none waits for the others at the end of an epoch."""
    padding = (-len(order)) % world_size
    mine = np.concatenate([order, order[:padding]])[rank::world_size]
    return [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
