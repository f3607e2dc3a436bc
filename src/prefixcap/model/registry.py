"""Model names -> model directories: registered pretrained models (converted and cached on first use,
like open_clip's registry), local directories and hub repo ids. Torch, the converter and the model class
are imported only when a model is resolved, so `prefixcap --help` stays light."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefixcap.errors import ModelLoadError
from prefixcap.model.config import CONFIG_NAME
from prefixcap.system.hub import hub_problem, missing_from_hub

if TYPE_CHECKING:
    import torch

    from prefixcap.model.caption_model import CaptionModel

DEFAULT_MODEL = "clipcap-coco"


@dataclass(frozen=True)
class PretrainedSpec:
    repo_id: str  # hub repo holding the original ClipCap checkpoint
    filename: str  # checkpoint file in that repo
    vision_encoder: str  # CLIP the features came from
    decoder: str  # base decoder architecture and tokenizer
    description: str


REGISTRY: dict[str, PretrainedSpec] = {
    "clipcap-coco": PretrainedSpec(
        "akhaliq/CLIP-prefix-captioning-COCO-weights", "coco_weights.pt",
        "openai/clip-vit-base-patch32", "gpt2", "ClipCap MLP mapper (K=10) + fine-tuned GPT-2, trained on COCO",
    ),
    "clipcap-conceptual": PretrainedSpec(
        "akhaliq/CLIP-prefix-captioning-conceptual-weights", "conceptual_weights.pt",
        "openai/clip-vit-base-patch32", "gpt2",
        "ClipCap MLP mapper (K=10) + fine-tuned GPT-2, trained on Conceptual Captions",
    ),
}  # fmt: skip


def cache_dir() -> Path:
    """Converted models live beside the Hugging Face cache, so one setting moves both."""
    from huggingface_hub import constants

    return Path(os.environ.get("PREFIXCAP_CACHE", Path(constants.HF_HOME) / "prefixcap"))


def resolve(name: str) -> Path:
    """Download and convert a registered checkpoint the first time; afterwards read the cache."""
    from prefixcap.model.clipcap import convert_clipcap

    spec = REGISTRY[name]
    target = cache_dir() / name
    if (target / CONFIG_NAME).is_file():
        return target
    checkpoint = _hub_download(spec.repo_id, spec.filename, name)
    convert_clipcap(checkpoint, target, vision_encoder=spec.vision_encoder, decoder=spec.decoder, save_frozen=False)
    return target


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """A registered name, a local directory or a hub repo id, as a local directory."""
    if str(name_or_dir) in REGISTRY:
        return resolve(str(name_or_dir))
    path = Path(name_or_dir)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: is a file; a model is a directory (see `prefixcap convert-clipcap`)")
        return path
    return download_model_repo(str(name_or_dir))


def load_model(
    name_or_dir: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> CaptionModel:
    """A registered name (`clipcap-coco`), a model directory or a hub repo id, loaded."""
    from prefixcap.model.caption_model import CaptionModel

    return CaptionModel.from_pretrained(resolve_model_dir(name_or_dir), device=device, dtype=dtype)


def download_model_repo(repo_id: str) -> Path:
    """A prefixcap model directory pushed to the hub with `push_to_hub`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if reason := missing_from_hub(repo_id):
        raise ModelLoadError(f"{repo_id}: cannot load the model ({reason})")
    try:
        return Path(snapshot_download(repo_id))
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"{repo_id}: no such directory, and it is not in the hub cache (offline?)") from None
    except (HfHubHTTPError, ValueError) as error:
        names = ", ".join(REGISTRY)
        raise ModelLoadError(
            f"{repo_id}: not a model directory, a registered name ({names}) or a reachable hub repo ({error})"
        ) from None


def _hub_download(repo_id: str, filename: str, name: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    problem = hub_problem()  # an unreachable hub: offline at once, not minutes of retries
    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{name}: {repo_id}/{filename} is not in the Hugging Face cache, and "
            f"{problem or 'the hub cannot be reached'}; connect once to download it, or load a local model "
            "directory instead (--model DIR on the command line, its path in Python)"
        ) from None
    except HfHubHTTPError as error:
        raise ModelLoadError(f"{name}: downloading {repo_id}/{filename} failed ({error})") from None
