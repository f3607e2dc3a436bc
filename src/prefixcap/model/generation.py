"""The text side of a caption model, written once for every runtime: the PyTorch `CaptionModel` and an
ONNX export (`prefixcap.onnx.runtime.OnnxCaptionModel`) both inherit `CaptionGeneration`.

It owns the text policy: a request's options over the model's generation defaults, checked once
and against the decoder's positions (`request`); the prompt the decoder continues after the image
(the model's trained one by default); the stop tokens; and turning generated ids into captions.
Generation itself joins the prompt's embeddings to the image prefix (each row's own, when images
have prompts of different lengths: right-padded, with each row's length) and hands the result to
the backend that `prefixcap.engine.backends` chooses for the model's decoder, in one batch.

A runtime provides `config`, `tokenizer`, `decoder` (what the backend decodes with),
`max_new_tokens_limit`, `image_prefix` (its inputs to prefix embeddings) and `token_embeddings`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prefixcap.engine import DecodeSpec, backends
from prefixcap.errors import ModelLoadError
from prefixcap.model.config import CaptionConfig
from prefixcap.options import CaptionRequest, GenerationOptions, TextOptions, clean_prompt


class CaptionGeneration:
    config: CaptionConfig
    tokenizer: Any  # a Hugging Face tokenizer
    decoder: Any  # an nn.Module, or a forward on another runtime (`engine.runner.DecoderForward`)

    @property
    def max_new_tokens_limit(self) -> int | None:
        """The longest caption that fits in the decoder's positions after the prefix (None: no limit)."""
        raise NotImplementedError

    def image_prefix(
        self, pixel_values: torch.Tensor | None, pixels: torch.Tensor | None, image_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Prefix embeddings [B, K, E] of exactly one of float `pixel_values`, uint8 `pixels` or `image_embeds`."""
        raise NotImplementedError

    def token_embeddings(self, token_ids: list[int], like: torch.Tensor) -> torch.Tensor:
        """The decoder's input embeddings [T, E] of `token_ids`, on `like`'s device and in its dtype."""
        raise NotImplementedError

    # ------------------------------------------------------------------ requests: checked once
    def request(self, *, rerank: Any = None, **kwargs: Any) -> CaptionRequest:
        """The request `kwargs` describe (decoding options by their `generate` names, and the caption
        text options: prompt, keep_prompt, prefix, suffix), over this model's defaults, checked once:
        ValueError with a readable reason for anything that cannot work, before any work starts."""
        text, generation = TextOptions.split(kwargs)
        return CaptionRequest(self.generation_options(prompt=text.prompt, **generation), text, rerank)

    def generation_options(self, *, prompt: str | None = None, **generation_kwargs: Any) -> GenerationOptions:
        """`generation_kwargs` over this model's generation defaults (`GenerationOptions.resolve`),
        validated, also against the positions `prompt` (see `generate`) leaves."""
        options = GenerationOptions.resolve(self.config.generation, generation_kwargs)
        self.check_prompt(prompt, options)
        return options

    def check_prompt(self, prompt: str | None, options: GenerationOptions) -> None:
        """Raise ValueError when the prefix, `prompt` and `options.max_new_tokens` do not fit in the
        decoder's positions."""
        limit = self.max_new_tokens_limit
        if limit is None:
            return
        prompt_length = len(self.prompt_ids(prompt))
        prefix = self.config.prefix_length
        if prompt_length >= limit:
            raise ValueError(
                f"the prompt is {prompt_length} tokens, but the decoder has {limit + prefix} "
                f"positions and the prefix takes {prefix}: at most {limit - 1} prompt tokens fit"
            )
        if options.max_new_tokens > limit - prompt_length:
            taken = f"the prefix takes {prefix}" + (f" and the prompt {prompt_length}" if prompt_length else "")
            raise ValueError(
                f"max_new_tokens must be <= {limit - prompt_length}: the decoder has {limit + prefix} positions "
                f"and {taken}"
            )

    def prompt_ids(self, prompt: str | None = None) -> list[int]:
        """The token ids of `prompt` (None: the model's trained prompt; "": none), whitespace
        normalised as in training (`clean_prompt`)."""
        text = self.config.prompt if prompt is None else clean_prompt(prompt)
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def stop_token_ids(self) -> list[int]:
        """EOS, plus the configured stop token (ClipCap models were trained to end at ".")."""
        ids = [self.tokenizer.eos_token_id]
        if self.config.stop_token:
            stop = self.tokenizer.encode(self.config.stop_token, add_special_tokens=False)
            if len(stop) != 1:
                raise ModelLoadError(f"stop_token {self.config.stop_token!r} is not a single token of the tokenizer")
            ids.append(stop[0])
        return ids

    def _check_defaults(self) -> None:
        """Refuse a stop token or generation defaults that cannot work with this tokenizer and
        decoder when the model is built, so that commands and the server fail at start-up rather
        than on every request."""
        self.stop_token_ids()
        try:
            self.generation_options()
        except ValueError as error:
            raise ModelLoadError(f"generation defaults: {error}") from None

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        pixels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        request: CaptionRequest | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Caption token ids [B * num_return_sequences, T], padded with the pad token after the
        stop, from float `pixel_values` (the image processor's output), uint8 `pixels`
        (`preprocessor.pixels`, normalised on the model's device) or `image_embeds` (projected
        encoder embeddings, which skip the image encoder). The options are a `request` (see
        `request`), or the keyword arguments it is made of.

        With a prompt (None: the model's trained prompt, `config.prompt`; "": none) the decoder
        continues [prefix; prompt tokens], as it was trained to, and the ids are what follows it."""
        request = self._request_of(request, kwargs)
        prefix = self.image_prefix(pixel_values, pixels, image_embeds)
        return self.generate_from_prefix(prefix, request.generation, request.text.prompt)

    def generate_from_prefix(
        self,
        prefix: torch.Tensor,
        options: GenerationOptions,
        prompt: str | None = None,
        *,
        prompts: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """New token ids [B * n, T] continuing `prefix` [B, K, E] and `prompt`'s embeddings (the
        backend takes any prefix length: the prompt joins it), on the backend the decoder gets.
        `prompts` gives each row its own prompt instead: rows of different lengths, decoded in one
        batch (`prefixcap.engine.ragged`), each as it would be alone."""
        prompt_ids = [self.prompt_ids(text) for text in prompts] if prompts is not None else [self.prompt_ids(prompt)]
        embeds, lengths = self._prompted(prefix, prompt_ids)
        spec = DecodeSpec.of(options, eos_token_ids=self.stop_token_ids(), pad_token_id=self.tokenizer.pad_token_id)
        return backends.generate(self.decoder, embeds, spec, lengths)

    def _prompted(self, prefix: torch.Tensor, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, list[int] | None]:
        """[prefix; prompt embeddings] per row, from one prompt's ids for every row or one per row:
        (the embeddings, right-padded to the longest row, and each row's length, None when all are
        equal)."""
        batch, length, _ = prefix.shape
        if all(ids == prompt_ids[0] for ids in prompt_ids):
            if not prompt_ids[0]:
                return prefix, None
            prompt_embeds = self.token_embeddings(prompt_ids[0], prefix)
            return torch.cat([prefix, prompt_embeds.expand(batch, -1, -1)], dim=1), None
        if len(prompt_ids) != batch:
            raise ValueError(f"{len(prompt_ids)} prompts for {batch} rows: give one prompt per row")
        lengths = [length + len(ids) for ids in prompt_ids]
        embeds = prefix.new_zeros((batch, max(lengths), prefix.shape[2]))
        embeds[:, :length] = prefix
        for ids in {tuple(ids) for ids in prompt_ids if ids}:  # each distinct prompt embedded once
            rows = [row for row, other in enumerate(prompt_ids) if tuple(other) == ids]
            embeds[rows, length : length + len(ids)] = self.token_embeddings(list(ids), prefix)
        return embeds, lengths

    @torch.no_grad()
    def caption(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        pixels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        request: CaptionRequest | None = None,
        prompts: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[list[str]]:
        """Captions grouped per image (`num_return_sequences` each, best first), decoded and
        whitespace-normalised; the inputs and options are those of `generate`. `prompts` gives
        each image its own prompt (a dataset's records', or retrieved captions': None, the model's
        trained one), each checked against the positions too; the images are then decoded in one
        batch whatever their prompts' lengths (a list as `prompt=` means the same). With
        `keep_prompt`, each caption starts with its prompt (decoded with what follows it, so the
        spacing is the tokens')."""
        if not isinstance(kwargs.get("prompt"), str | None):
            prompts = list(kwargs.pop("prompt"))
        request = self._request_of(request, kwargs)
        prefix = self.image_prefix(pixel_values, pixels, image_embeds)
        if prompts is None:
            prompts = [request.text.prompt] * prefix.shape[0]
        elif len(prompts) != prefix.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {prefix.shape[0]} images: give one prompt per image")
        else:
            for prompt in dict.fromkeys(prompts):  # distinct, in first-seen order
                self.check_prompt(prompt, request.generation)
        ids = self.generate_from_prefix(prefix, request.generation, prompts=prompts)
        per_image = ids.shape[0] // max(prefix.shape[0], 1)
        rows: list[list[int]] | torch.Tensor = ids
        if request.text.keep_prompt:
            rows = [self.prompt_ids(prompts[row // per_image]) + tokens for row, tokens in enumerate(ids.tolist())]
        texts = self.detokenize(rows)
        return [texts[start : start + per_image] for start in range(0, len(texts), per_image)]

    def detokenize(self, token_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Generated ids (rows of ids) to captions: special tokens dropped, whitespace normalised."""
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]

    def _request_of(self, request: CaptionRequest | None, kwargs: dict[str, Any]) -> CaptionRequest:
        """`request` as given, or the one the keyword arguments describe (one or the other)."""
        if request is None:
            return self.request(**kwargs)
        if kwargs:
            raise TypeError(f"pass either a request or options, not both (got {', '.join(sorted(kwargs))})")
        return request
