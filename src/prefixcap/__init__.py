"""prefixcap: image captioning with CLIP prefixes and GPT-2 (the ClipCap design)."""

from prefixcap.captioner import Captioner
from prefixcap.config import CaptionConfig
from prefixcap.errors import ImageLoadError, ModelLoadError, UserError
from prefixcap.generation import GenerationOptions
from prefixcap.images import load_image
from prefixcap.modeling import CaptionModel
from prefixcap.pretrained import REGISTRY as PRETRAINED_MODELS

__version__ = "0.1.0"
__all__ = [
    "CaptionConfig",
    "CaptionModel",
    "Captioner",
    "GenerationOptions",
    "ImageLoadError",
    "ModelLoadError",
    "PRETRAINED_MODELS",
    "UserError",
    "load_image",
]
