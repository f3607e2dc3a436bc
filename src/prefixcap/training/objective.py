"""The training objective: next-token cross-entropy on the caption tokens and EOS only.

`CaptionModel.forward` returns logits for every position, prefix and padding included: with
K=10, 10-20 caption tokens and GPT-2's 50,257-word vocabulary, about half of the largest matmul
and of the float32 cross-entropy work is for positions whose loss is then thrown away. Here the
LM head runs only where there is a target. The loss is the same (a test checks it); the module
is what Accelerate wraps for data parallelism, so its forward is the whole training computation.

It also swaps GPT-2's `gelu_new` for PyTorch's tanh GELU: the same function, but eager `gelu_new`
is eight elementwise kernels forward and more backward over the largest activation, where the
swap is one each way (measured: benchmarks/results/cpu-2026-11-29/notes.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from prefixcap.model.caption_model import CaptionModel


class CaptionLoss(nn.Module):
    """`prefix_dropout`: the chance that a training caption's image embedding is zeroed (only in
    train mode), so that its prefix is the mapper's constant output for "no image" and the caption
    must come from the prompt alone: with retrieval, the model learns to read the retrieved captions
    instead of ignoring them for its image (`train --prefix-dropout`)."""

    def __init__(self, model: CaptionModel, prefix_dropout: float = 0.0):
        super().__init__()
        self.model = model
        self.prefix_dropout = prefix_dropout
        use_one_kernel_gelu(model.decoder)

    def forward(
        self,
        *,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy over the targets (labels != -100) of a `CaptionTargets` batch.

        `attention_mask` is part of the batch but not needed: captions are padded on the right, so
        causal attention alone keeps every real position from seeing padding. Without a mask,
        SDPA takes its causal fast path and no padding mask is built at every step."""
        targets = labels != -100
        if self.training and self.prefix_dropout:
            dropped = torch.rand(image_embeds.shape[0], device=image_embeds.device) < self.prefix_dropout
            image_embeds = image_embeds.masked_fill(dropped.view(-1, *[1] * (image_embeds.ndim - 1)), 0)
        return F.cross_entropy(self.target_logits(image_embeds, input_ids, targets).float(), labels[targets])

    def target_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] of the N positions where `targets` ([B, T] bool) is set, row by row:
        a teacher-forced pass over [prefix; input_ids] (also the SCST objective's, training/scst.py)."""
        decoder = self.model.decoder
        embeds = self.model.embed_inputs(input_ids, image_embeds=image_embeds)
        prefix_length = self.model.config.prefix_length
        hidden = decoder.base_model(inputs_embeds=embeds).last_hidden_state
        # Position K-1+t predicts caption token t; keep only the positions that have a target.
        hidden = hidden[:, prefix_length - 1 : -1][targets]
        return decoder.get_output_embeddings()(hidden)


def use_one_kernel_gelu(module: nn.Module) -> None:
    """Replace every `gelu_new` activation under `module` by the equal one-kernel tanh GELU.
    Activations hold no weights, so saved models and their configs are unchanged."""
    from transformers.activations import ACT2FN, NewGELUActivation

    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])
