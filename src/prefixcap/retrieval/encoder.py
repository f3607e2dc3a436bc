"""The CLIP that embeds a datastore's captions, and the record that ties a store to it.

Captions are embedded with CLIP's text tower and text projection, then L2-normalised; a caption
model with the same CLIP as its image encoder gives projected image embeddings (`ImageEncoder`'s
pooled output for the `clip` family) in the same space, so image-to-text retrieval is an inner
product of normalised vectors (SmallCap's choice).

A store records its CLIP by what it computes rather than by name, since one CLIP has many names
(a hub id, a local copy, the `vision_encoder/` folder of a model directory): the normalised
embeddings of a few fixed probe images (through the same `ImageEncoder` and preprocessing a caption
model uses) and probe texts. A model whose encoder gives the same probe image embeddings, in
any dtype or on any device, is using this store's space; any other is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection

from prefixcap.errors import ModelLoadError, UserError
from prefixcap.inputs.preprocess import ImagePreprocessor
from prefixcap.model.caption_model import embed_pixels
from prefixcap.model.config import normalize_model_id
from prefixcap.model.encoders import ImageEncoder, load_image_encoder, load_image_processor
from prefixcap.model.hf_loading import hf_call, load_checked
from prefixcap.system.hardware import default_device

PROBE_IMAGES = 4
PROBE_SEED = 0
PROBE_TEXTS = ("a photo of a dog.", "a red car parked on a street.", "two people at a table with food.")
# The least cosine between a probe's recorded and recomputed embedding for one CLIP: bf16 and fp16
# runs of one CLIP agree far above it, two different CLIPs far below.
PROBE_AGREEMENT = 0.99
MAX_EMBED_DIM = 16384  # as CaptionConfig's limit: a damaged manifest fails before anything is allocated
MAX_IMAGE_SIDE = 4096


def probe_pixels(height: int, width: int) -> torch.Tensor:
    """PROBE_IMAGES fixed uint8 images [P, 3, H, W]: random 4 x 4 grids of colour blocks, the
    same on every machine (numpy's PCG64 with a fixed seed)."""
    blocks = np.random.default_rng(PROBE_SEED).integers(0, 256, (PROBE_IMAGES, 3, 4, 4), dtype=np.uint8)
    rows, columns = np.arange(height) * 4 // height, np.arange(width) * 4 // width
    return torch.from_numpy(np.ascontiguousarray(blocks[:, :, rows][:, :, :, columns]))


def image_probe(vision_encoder: ImageEncoder, preprocessor: ImagePreprocessor) -> np.ndarray:
    """[P, D] normalised pooled embeddings of the probe images, as a caption model computes them."""
    size = preprocessor.output_size
    if size is None:
        raise UserError("the image processor has no fixed output size to probe the encoder with")
    embeds = embed_pixels(vision_encoder, preprocessor, probe_pixels(*size))
    return F.normalize(embeds.float(), dim=-1).cpu().numpy()


@dataclass(frozen=True)
class EncoderRecord:
    """The CLIP a store's captions were embedded with: its name, as given (for messages and
    for `datastore add`), and what identifies it (the probes)."""

    name: str  # hub id, or absolute folder
    embed_dim: int
    image_size: tuple[int, int]  # (height, width) the encoder takes, the probe images' size
    image_probe: np.ndarray  # [PROBE_IMAGES, embed_dim] normalised image embeddings of probe_pixels
    text_probe: np.ndarray  # [len(PROBE_TEXTS), embed_dim] normalised text embeddings of PROBE_TEXTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": "clip",
            "embed_dim": self.embed_dim,
            "image_size": list(self.image_size),
            "image_probe": self.image_probe.tolist(),
            "text_probe": self.text_probe.tolist(),
        }

    @classmethod
    def from_dict(cls, values: Any, where: str) -> EncoderRecord:
        """The record in a manifest, checked: every field present, typed and consistent."""
        if not isinstance(values, dict) or set(values) != {
            "name", "family", "embed_dim", "image_size", "image_probe", "text_probe"
        }:  # fmt: skip
            raise UserError(f"{where}: encoder: expected name, family, embed_dim, image_size and the probes")
        name, dim, size = values["name"], values["embed_dim"], values["image_size"]
        if values["family"] != "clip" or not isinstance(name, str) or not name:
            raise UserError(f"{where}: encoder: expected a named CLIP, got {values['family']!r} {name!r}")
        if not _is_int(dim, 1, MAX_EMBED_DIM):
            raise UserError(f"{where}: encoder: embed_dim must be an integer in [1, {MAX_EMBED_DIM}]")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(side, 1, MAX_IMAGE_SIDE) for side in size)):
            raise UserError(f"{where}: encoder: image_size must be [height, width]")
        probes = {}
        for key, rows in (("image_probe", PROBE_IMAGES), ("text_probe", len(PROBE_TEXTS))):
            probes[key] = _unit_rows(values[key], rows, dim, f"{where}: encoder: {key}")
        return cls(name, dim, (size[0], size[1]), **probes)

    def agreement(self, other: EncoderRecord) -> float:
        """The least cosine between the two records' probes (1 for the same CLIP)."""
        if (self.embed_dim, self.image_size) != (other.embed_dim, other.image_size):
            return -1.0
        return min(
            float((self.image_probe * other.image_probe).sum(axis=1).min()),
            float((self.text_probe * other.text_probe).sum(axis=1).min()),
        )

    def mismatch(self, model: Any) -> str | None:
        """Why `model` (a CaptionModel) embeds images in another space than this CLIP's, or None."""
        encoder = model.vision_encoder
        if encoder.family != "clip":
            return f"is a {encoder.family} tower, not a CLIP"
        if encoder.embed_dim != self.embed_dim:
            return f"gives {encoder.embed_dim}-d embeddings, not {self.embed_dim}-d"
        size = model.preprocessor.output_size
        if size != self.image_size:
            given = "images of varying size" if size is None else f"{size[0]}x{size[1]} images"
            return f"takes {given}, not {self.image_size[0]}x{self.image_size[1]}"
        cosine = float((image_probe(encoder, model.preprocessor) * self.image_probe).sum(axis=1).min())
        if cosine < PROBE_AGREEMENT:
            return f"embeds images differently (probe cosine {cosine:.3f})"
        return None


class CaptionEncoder:
    """A full CLIP's text tower with its projection and tokenizer, and its image tower for the
    probes: `embed(captions)` gives [n, D] float32 normalised embeddings."""

    def __init__(
        self,
        name: str,
        text_model: CLIPTextModelWithProjection,
        tokenizer: Any,
        vision_encoder: ImageEncoder,
        preprocessor: ImagePreprocessor,
        *,
        batch_size: int = 256,
    ) -> None:
        self.name = name
        self.text_model = text_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vision_encoder = vision_encoder
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        positions = text_model.config.max_position_embeddings
        self.max_length = min(positions, tokenizer.model_max_length or positions)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, *, device: str | torch.device | None = None, batch_size: int = 256
    ) -> CaptionEncoder:
        """A full CLIP checkpoint (both towers, as on the hub: hub id or folder); anything else,
        including a vision-only tower, is refused in one line."""
        config = hf_call(AutoConfig.from_pretrained, source, "CLIP config")
        if config.model_type != "clip":
            raise ModelLoadError(
                f"{source}: a datastore needs a full CLIP (text and image towers), found model_type {config.model_type!r}"
            )
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim  # the sub-config's own value is a default
        text_model = load_checked(
            CLIPTextModelWithProjection.from_pretrained, source, "CLIP text tower", config=text_config
        )
        tokenizer = hf_call(AutoTokenizer.from_pretrained, source, "CLIP tokenizer")
        device = torch.device(device) if device is not None else default_device()
        return cls(
            normalize_model_id(source),
            text_model.to(device),
            tokenizer,
            load_image_encoder(source).to(device),
            ImagePreprocessor(load_image_processor(source)),
            batch_size=batch_size,
        )

    @property
    def embed_dim(self) -> int:
        return self.text_model.config.projection_dim

    @torch.inference_mode()
    def embed(self, captions: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """[len(captions), D] float32 normalised embeddings. Captions are batched by length (less
        padding; the text tower masks it, so the result does not depend on the batch), and
        truncated to CLIP's context length."""
        out = np.empty((len(captions), self.embed_dim), dtype=np.float32)
        order = sorted(range(len(captions)), key=lambda row: len(captions[row]))
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="embedding captions", unit="batch", disable=None if progress else True):
            rows = order[start : start + self.batch_size]
            inputs = self.tokenizer(
                [captions[row] for row in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.text_model.device)
            embeds = self.text_model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).text_embeds
            out[rows] = F.normalize(embeds.float(), dim=-1).cpu().numpy()
        return out

    def record(self) -> EncoderRecord:
        size = self.preprocessor.output_size
        if size is None:
            raise ModelLoadError(f"{self.name}: the CLIP's image processor has no fixed output size")
        return EncoderRecord(
            self.name,
            self.embed_dim,
            size,
            image_probe(self.vision_encoder, self.preprocessor),
            self.embed(PROBE_TEXTS),
        )


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _unit_rows(values: Any, rows: int, dim: int, where: str) -> np.ndarray:
    """A [rows, dim] float32 array of unit vectors from JSON lists, or one line saying why not."""
    numbers = (
        isinstance(values, list)
        and len(values) == rows
        and all(isinstance(row, list) and len(row) == dim for row in values)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for row in values for x in row)
    )
    array = np.array(values, dtype=np.float64) if numbers else None
    if array is None or not np.isfinite(array).all():
        raise UserError(f"{where}: expected {rows} rows of {dim} finite numbers")
    if np.abs(np.linalg.norm(array, axis=1) - 1).max() > 1e-3:
        raise UserError(f"{where}: rows are not unit vectors")
    return array.astype(np.float32)
