"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021), with any transformers CLIP.

    CLIP-S(c, v)       = w * max(cos(E_v, E_c), 0),            w = 2.5
    RefCLIP-S(c, R, v) = H-mean(CLIP-S(c, v), max(max_r cos(E_c, E_r), 0))

Captions and references are both embedded with the prompt "A photo depicts " in front, as in
Hessel's reference code; the reference term carries no w. Scores are on Hessel's scale (a good
COCO model gets about 0.75), not torchmetrics' 100 * cos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from prefixcap.errors import UserError
from prefixcap.evaluation.notices import notice
from prefixcap.inputs.loader import ImageLoader, chunked
from prefixcap.inputs.preprocess import ImagePreprocessor

PROMPT = "A photo depicts "
W = 2.5
REFERENCES_CLIPSCORE = "CLIPScore (references)"


def clip_s(image_embeds: torch.Tensor, text_embeds: torch.Tensor, w: float = W) -> torch.Tensor:
    """Per-pair CLIP-S of [N, D] image and caption embeddings (any scale; they are normalised)."""
    return w * F.cosine_similarity(image_embeds, text_embeds, dim=-1).clamp(min=0)


def ref_clip_s(
    clip_scores: torch.Tensor, caption_embeds: torch.Tensor, reference_embeds: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per-caption RefCLIP-S from CLIP-S [N], caption embeddings [N, D] and each caption's references [R_i, D]."""
    ref_sim = torch.stack(
        [
            F.cosine_similarity(caption[None], refs, dim=-1).max()
            for caption, refs in zip(caption_embeds, reference_embeds)
        ]
    ).clamp(min=0)
    total = clip_scores + ref_sim
    # The harmonic mean is 0 when both terms are (Hessel's code gives NaN there); NaN stays NaN.
    return torch.where(total == 0, torch.zeros_like(total), 2 * clip_scores * ref_sim / total)


@dataclass
class CLIPScoreResult:
    clip_s: torch.Tensor  # [N] CLIP-S per image; NaN where the image could not be read
    ref_clip_s: torch.Tensor | None  # [N] RefCLIP-S per image, None without references
    # [N] the mean CLIP-S of each image's references: how well the references themselves fit the
    # images, the bar for the captions (e.g. a teacher's captions, which a student learned from)
    references_clip_s: torch.Tensor | None = None

    def summary(self) -> dict[str, float]:
        """Corpus means over the readable images, named as in metrics.json."""
        out = {"CLIPScore": float(self.clip_s.nanmean())}
        if self.ref_clip_s is not None:
            out["RefCLIPScore"] = float(self.ref_clip_s.nanmean())
        if self.references_clip_s is not None:
            out[REFERENCES_CLIPSCORE] = float(self.references_clip_s.nanmean())
        return out


class CLIPScorer:
    """A full CLIP (both towers) with its tokenizer and image processor, batched on one device."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, *, batch_size: int = 64) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.preprocessor = ImagePreprocessor(image_processor)  # uint8 in threads, floats on the device
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, name_or_dir: str, *, device: str | None = None, batch_size: int = 64, flag: str = "--clip-model"
    ) -> CLIPScorer:
        """Load a full CLIP; failing that, a UserError that names the model and `flag`, the option choosing it."""
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        from prefixcap.model.encoders import load_image_processor
        from prefixcap.model.hf_loading import refuse_remote_code
        from prefixcap.system.hardware import default_device
        from prefixcap.system.hub import missing_from_hub
        from prefixcap.system.quiet import quiet_transformers

        refuse_remote_code(name_or_dir)
        reason = missing_from_hub(name_or_dir)  # an unreachable hub: at once, not after minutes of retries
        try:
            if reason:
                raise ValueError(reason)
            with quiet_transformers():
                config = AutoConfig.from_pretrained(name_or_dir, trust_remote_code=False)
                if config.model_type != "clip":
                    raise ValueError(f"it is a {config.model_type!r}, not a full CLIP with a text tower")
                model, info = CLIPModel.from_pretrained(
                    name_or_dir, use_safetensors=True, output_loading_info=True, trust_remote_code=False
                )
                if info["missing_keys"]:
                    raise ValueError(f"weights missing, e.g. {sorted(info['missing_keys'])[0]}")
                tokenizer = AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=False)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0]
            raise UserError(
                f"cannot load CLIP model {name_or_dir!r} for CLIPScore ({reason}); choose one with {flag}"
            ) from None
        return cls(
            model.to(device or default_device()), tokenizer, load_image_processor(name_or_dir), batch_size=batch_size
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_text_tokens(self) -> int:
        """The longest text the text tower takes: its positions, unless the tokenizer's limit is
        lower. Some tokenizers set no limit at all, and a longer text fails in the tower."""
        return min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] projected embeddings of PROMPT + text, truncated to CLIP's context length
        (`max_text_tokens`): one cut for CLIPScore, RefCLIPScore and reranking."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = [PROMPT + text for text in texts[start : start + self.batch_size]]
            inputs = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
            ).to(self.device)
            chunks.append(self.model.get_text_features(**inputs).pooler_output.float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.config.projection_dim)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, D] projected image embeddings."""
        loader = ImageLoader(self.preprocessor)
        return self._embed_pixels(torch.stack([loader.load(image) for image in images]))

    @torch.inference_mode()
    def _embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, D] projected embeddings of uint8 `pixels` (normalised on the model's device)."""
        pixel_values = self.preprocessor.normalize(pixels.to(self.device)).to(self.model.dtype)
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output.float().cpu()

    def __call__(self, pixels: torch.Tensor, captions: Sequence[Sequence[str]]) -> list[list[float]]:
        """CLIP-S of each image's candidate captions: `captioner.Reranker`, for reranking at inference.
        `pixels` are a captioner's uint8 [N, 3, H, W], preprocessed for its own encoder; they are
        resized and cropped again with this CLIP's processor (a no-op for the same CLIP)."""
        images = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in pixels]
        image_embeds = self._embed_pixels(torch.stack([self.preprocessor.pixels(image) for image in images]))
        caption_embeds = self.embed_texts([caption for per_image in captions for caption in per_image])
        counts = [len(per_image) for per_image in captions]
        repeated = image_embeds.repeat_interleave(torch.tensor(counts), dim=0)
        return [scores.tolist() for scores in clip_s(repeated, caption_embeds).split(counts)]

    def score(
        self,
        images: Sequence[Any],
        captions: Sequence[str],
        references: Sequence[Sequence[str]] | None = None,
        *,
        workers: int = 4,
    ) -> CLIPScoreResult:
        """CLIP-S (and RefCLIP-S with references) of each caption for its image.

        `images` are paths or records' images (`shard.tar#member`), decoded by `workers` threads
        (see `ImageLoader`). Unreadable images get NaN and are left out of the means, with one
        notice, so one bad file does not stop a run.
        """
        image_embeds = torch.full((len(images), self.model.config.projection_dim), float("nan"))
        failures = []
        batches = ImageLoader(self.preprocessor).batches(
            chunked(images, self.batch_size), batch_size=self.batch_size, workers=workers
        )
        total = math.ceil(len(images) / self.batch_size)
        for batch in tqdm(batches, total=total, desc="CLIPScore", unit="batch", leave=False, disable=None):
            if batch.pixels is not None:
                first = batch.unit * self.batch_size  # the index of the batch's first image
                image_embeds[[first + index for index in batch.readable]] = self._embed_pixels(batch.pixels)
            failures.extend(batch.failures.values())
        if failures:
            notice(f"CLIPScore left out {len(failures)} unreadable image(s), e.g. {failures[0]}")
        caption_embeds = self.embed_texts(captions)
        scores = clip_s(image_embeds, caption_embeds)  # NaN rows stay NaN
        if references is None:
            return CLIPScoreResult(scores, None)
        flat = [ref for refs in references for ref in refs]
        counts = [len(refs) for refs in references]
        flat_embeds = self.embed_texts(flat)
        reference_embeds = flat_embeds.split(counts)
        per_reference = clip_s(image_embeds.repeat_interleave(torch.tensor(counts), dim=0), flat_embeds)
        references_clip_s = torch.stack([scores.mean() for scores in per_reference.split(counts)])
        return CLIPScoreResult(scores, ref_clip_s(scores, caption_embeds, reference_embeds), references_clip_s)


def load_reranker(captioner: Any, clip_model: str | None = None, *, flag: str = "--rerank-clip") -> CLIPScorer:
    """The CLIPScorer that reranks a `Captioner`'s candidates (`rerank=`), on its device:
    `clip_model`, else the model's own CLIP (its config's `vision_encoder`), which must then be a
    full CLIP with a text tower; `flag` is the option that names another, for the error."""
    name = clip_model or str(captioner.model.config.vision_encoder)
    return CLIPScorer.from_pretrained(name, device=captioner.model.device, flag=flag)
