"""Training options: one dataclass, filled from its defaults, then a YAML/JSON file, then the command
line (flags win). A run stores its resolved options, so `--resume` continues with the same ones."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefixcap.errors import UserError
from prefixcap.model.config import CONFIG_FIELDS, MAPPER_KINDS, CaptionConfig
from prefixcap.options import MAX_TEXT_CHARS
from prefixcap.options.fields import above, at_least, between, check_fields, field_bounds, option
from prefixcap.options.text import template_problem

_FREEZE = re.compile(r"^(frozen|none|lora|first:(\d+))$")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # one --lora-targets entry
PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULES = ("linear", "cosine")
CAPTION_MODES = ("all", "one")
BEST_METRICS = ("cider", "bleu4", "loss")
OBJECTIVES = ("xent", "scst")
SCST_REWARDS = ("cider", "clipscore", "cider+clipscore")
SCST_BASELINES = ("mean", "greedy")
MAX_SAMPLES_PER_IMAGE = 100  # scst: each step samples batch_size x this many captions at most
# The model config's fields that a run sets (by the model config's names, with its ranges and help);
# a new model is `CaptionConfig(vision_encoder=<the store's>, **TrainConfig.model_options)`.
MAPPER_SIZE_FIELDS = ("mapper_num_layers", "mapper_num_heads", "mapper_width")  # each a --flag
MODEL_FIELDS = ("decoder", "mapper", "prefix_length", *MAPPER_SIZE_FIELDS)
# Earlier names of options, which flags, config files and stored runs may still use.
RENAMED = {"mapper_layers": "mapper_num_layers", "mapper_heads": "mapper_num_heads"}


def _model_field(name: str, default: Any) -> Any:
    """A TrainConfig field that is the model config's field `name` (its help and range)."""
    return field(default=default, metadata=CONFIG_FIELDS[name].metadata)


@dataclass
class TrainConfig:
    features: str | None = None  # FEATURES folder written by `prefixcap prepare`
    out: str | None = None  # RUN_DIR: checkpoints, logs and plots
    # The model: MODEL_FIELDS, as the model config names them (None: the model config's default)
    decoder: str = CaptionConfig.decoder  # causal LM to start from: hub id or folder
    mapper: str = CaptionConfig.mapper  # prefix mapper: a MAPPERS kind
    prefix_length: int = _model_field("prefix_length", CaptionConfig.prefix_length)
    mapper_num_layers: int | None = _model_field("mapper_num_layers", None)
    mapper_num_heads: int | None = _model_field("mapper_num_heads", None)
    mapper_width: int | None = _model_field("mapper_width", None)
    freeze: str = "none"  # frozen: mapper only (ClipCap) | none | first:N embeddings + first N blocks | lora
    epochs: int = option(10, bounds=at_least(1))
    batch_size: int = option(256, bounds=at_least(1))  # captions per process per micro-batch
    lr: float = option(1e-4, bounds=above(0))  # peak learning rate
    warmup: float = option(0.05, bounds=at_least(0))  # warm-up: a fraction of all steps if < 1, else a number of steps
    lr_schedule: str = "linear"  # decay after warm-up: linear | cosine
    weight_decay: float = option(0.01, bounds=at_least(0))  # AdamW decay of weight matrices (not of biases and norms)
    grad_accum: int = option(1, bounds=at_least(1))  # micro-batches per optimizer step
    max_grad_norm: float = option(1.0, bounds=at_least(0))  # clip the gradient norm to this (0 = no clipping)
    precision: str | None = None  # bf16 | fp16 | fp32 (None: bf16 on a CUDA GPU that has it, else fp32)
    # The random seed: initial weights, data order, caption choice and dropout all follow from it. NumPy's
    # legacy seeding, which accelerate's set_seed uses, takes 32 bits.
    seed: int = option(0, bounds=between(0, 2**32 - 1))
    captions_per_image: str = "all"  # all: every (image, caption) pair per epoch; one: one random caption
    max_caption_tokens: int | None = option(
        None, bounds=at_least(2)
    )  # caption tokens incl. EOS (None: enough for 99% of captions)
    prompt: str | None = None  # text every caption continues (None: each record's own `prompt`, if any)
    val_images: int = option(
        1000, bounds=at_least(0)
    )  # val images captioned for BLEU-4 and CIDEr-D after each epoch (0 = none)
    best_metric: str = "cider"  # what picks RUN_DIR/best: cider | bleu4 | loss (val loss)
    save_every: int = option(
        0, bounds=at_least(0)
    )  # also checkpoint RUN_DIR/last every N optimizer steps (0 = at epoch ends)
    log_every: int = option(10, bounds=at_least(1))  # optimizer steps between train-loss points in TensorBoard
    compile: bool = False  # torch.compile the model (worth it on GPUs; the first steps compile)
    # Self-critical sequence training (training/scst.py): `objective="scst"` fine-tunes the `init` model
    # on a reward of its own sampled captions; `batch_size` then counts images, each sampled
    # `samples_per_image` times. `init` also starts a cross-entropy run from a trained model.
    objective: str = "xent"  # xent: cross-entropy on the references | scst: self-critical sequence training
    init: str | None = None  # model to start from: a model directory, registered name or hub id
    reward: str = "cider"  # scst reward: cider (CIDEr-D) | clipscore (CLIP-S) | cider+clipscore
    samples_per_image: int = option(
        5, bounds=between(1, MAX_SAMPLES_PER_IMAGE)
    )  # scst: captions sampled per image per step
    baseline: str = "mean"  # scst: mean (of the image's other samples' rewards) | greedy (its greedy caption's)
    max_new_tokens: int | None = option(
        None, bounds=at_least(1)
    )  # scst: longest sampled caption in tokens (None: max_caption_tokens)
    reward_clip: str | None = None  # scst: full CLIP for CLIP-S (None: the model's own encoder's CLIP)
    reward_weights: str = "1,1"  # scst cider+clipscore: weights of CIDEr-D and CLIP-S, "W_CIDER,W_CLIP"
    # LoRA (`freeze="lora"`, prefixcap.model.lora): the mapper trains fully, the decoder only through low-rank
    # adapters on `lora_targets`; a model directory then holds the adapter, not a decoder copy.
    lora_rank: int = option(16, bounds=between(1, 4096))  # r, the rank of each adapter
    lora_alpha: float | None = option(
        None, bounds=above(0)
    )  # the adapters' scale is alpha / rank (None: 2 x rank, a scale of 2)
    lora_targets: str | None = None  # comma-separated module names (None: the decoder family's block linears)
    # Retrieval augmentation (SmallCap; prefixcap.retrieval): each image's prompt is the captions of its
    # `retrieve_k` nearest in `datastore` (its own left out), in `retrieval_template`, within
    # `retrieval_prompt_tokens` decoder tokens; the model records all three.
    datastore: str | None = None  # DS folder of `prefixcap datastore build`, built with the features' CLIP
    retrieve_k: int = _model_field("retrieval_k", 4)  # SmallCap's 4
    retrieval_template: str | None = (
        None  # with {captions} once (None: "Similar images show {captions} This image shows")
    )
    retrieval_prompt_tokens: int = _model_field("retrieval_prompt_tokens", 128)  # also at most half the positions
    # With a datastore: the chance that a caption is trained without its image (its prefix the mapper's output for a
    # zero embedding), so that the model learns to caption from the retrieved captions too, and follows another
    # domain's datastore when captioning, not only the words it learned for the images it saw.
    prefix_dropout: float = option(0.0, bounds=between(0, 1))

    def __post_init__(self) -> None:
        check_fields(TrainConfig, {name: getattr(self, name) for name in FIELDS}, error=UserError)
        checks = [
            (self.mapper in MAPPER_KINDS, f"mapper must be one of {', '.join(MAPPER_KINDS)}"),
            (_FREEZE.match(self.freeze) is not None, "freeze must be frozen, none, lora or first:N"),
            (
                self.precision is None or self.precision in PRECISIONS,
                f"precision must be one of {', '.join(PRECISIONS)}",
            ),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}"),
            (self.captions_per_image in CAPTION_MODES, "captions_per_image must be all or one"),
            (self.best_metric in BEST_METRICS, f"best_metric must be one of {', '.join(BEST_METRICS)}"),
            (
                self.lora_targets is None or all(_MODULE_NAME.match(name) for name in self.lora_targets.split(",")),
                "lora_targets must be comma-separated module names, e.g. q_proj,v_proj",
            ),
            (self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}"),
            (self.reward in SCST_REWARDS, f"reward must be one of {', '.join(SCST_REWARDS)}"),
            (self.baseline in SCST_BASELINES, f"baseline must be one of {', '.join(SCST_BASELINES)}"),
            (_weights(self.reward_weights) is not None, "reward_weights must be two numbers >= 0, e.g. 1,1"),
            (_weights(self.reward_weights) != (0, 0), "reward_weights must not both be 0 (the reward would be 0)"),
            (
                self.objective != "scst" or self.init is not None,
                "objective scst needs init: the model to fine-tune (trained with cross-entropy first)",
            ),
            (
                self.objective != "scst" or self.baseline != "mean" or self.samples_per_image >= 2,
                "baseline mean needs samples_per_image >= 2 (it is the mean of an image's other samples' rewards)",
            ),
            (
                self.prompt is None or len(self.prompt) <= MAX_TEXT_CHARS,
                f"prompt must be at most {MAX_TEXT_CHARS} characters",
            ),
            (
                self.retrieval_template is None or template_problem(self.retrieval_template) is None,
                f"retrieval_template: {template_problem(self.retrieval_template or '{captions}')}",
            ),
            (
                self.datastore is None or self.prompt is None,
                "--prompt and --datastore: with a datastore each image's prompt is the captions it retrieves",
            ),
            (
                not self.prefix_dropout or self.datastore is not None,
                "prefix_dropout needs datastore: without retrieved captions, a caption without its image has "
                "nothing to follow",
            ),
            (
                not self.prefix_dropout or self.objective == "xent",
                "prefix_dropout is for cross-entropy training (objective xent): scst samples captions of the images",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def frozen_blocks(self) -> int | None:
        """N for `first:N`, else None."""
        match = _FREEZE.match(self.freeze)
        return int(match[2]) if match and match[2] else None

    @property
    def lora_scale_alpha(self) -> float:
        """LoRA's alpha: `lora_alpha`, or 2 x `lora_rank` when unset."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def lora_target_names(self) -> tuple[str, ...] | None:
        """`lora_targets` as names (None: the decoder family's defaults)."""
        return None if self.lora_targets is None else tuple(self.lora_targets.split(","))

    @property
    def reward_weight_pair(self) -> tuple[float, float]:
        """`reward_weights` as (CIDEr-D weight, CLIP-S weight)."""
        pair = _weights(self.reward_weights)
        assert pair is not None  # checked in __post_init__
        return pair

    @property
    def model_options(self) -> dict[str, Any]:
        """The model config's values this run sets (MODEL_FIELDS; unset sizes left out)."""
        return {name: getattr(self, name) for name in MODEL_FIELDS if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_stored(cls, values: dict[str, Any]) -> TrainConfig:
        """The options a run stored (`to_dict`), by their current names."""
        return cls(**renamed(values))


def _weights(text: str) -> tuple[float, float] | None:
    """The weights in "W_CIDER,W_CLIP" as two finite floats >= 0, else None."""
    try:
        pair = tuple(float(part) for part in text.split(","))
    except ValueError:
        return None
    ok = len(pair) == 2 and all(math.isfinite(weight) and weight >= 0 for weight in pair)
    return (pair[0], pair[1]) if ok else None


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# The range of every numeric option (its field's bounds): config files, the command line's flags and
# TrainConfig itself are checked against them by the one validator, and none takes NaN or infinities.
BOUNDS = field_bounds(TrainConfig)


def renamed(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with options under their earlier names (RENAMED) under their current ones."""
    return {RENAMED.get(name, name): value for name, value in values.items()}


def field_kind(name: str) -> str:
    """The base type of option `name`: "int", "float", "str" or "bool" (`int | None` gives "int")."""
    return FIELDS[name].type.split(" ")[0]  # a string, as this module uses postponed annotations


def resolve_config(cli_values: dict[str, Any], config_file: str | Path | None) -> tuple[TrainConfig, dict[str, Any]]:
    """The options from defaults, then `config_file`, then `cli_values` (None = not given).
    Returns the config and the values given explicitly, which a resumed run must agree with."""
    given = read_config_file(config_file) if config_file else {}
    given.update({name: value for name, value in cli_values.items() if value is not None})
    return TrainConfig(**given), given


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Option values from a YAML or JSON mapping; keys may use dashes (`batch-size`) or underscores."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML or JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise UserError(f"{path}: a config file must hold a mapping of option names to values")
    values = {}
    for key, value in document.items():
        name = RENAMED.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in FIELDS:
            options = sorted(field.replace("_", "-") for field in FIELDS)  # as the flags and the README write them
            raise UserError(f"{path}: unknown option {key!r}; valid: {', '.join(options)}")
        if field_kind(name) == "float" and isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            value = _float_or_text(value)
        check_fields(TrainConfig, {name: value}, prefix=f"{path}: ", error=UserError, ranges=False)
        values[name] = value
    return values


def _float_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
