"""`prefixcap train`: train a caption model on a feature store written by `prefixcap prepare`."""

from __future__ import annotations

import argparse
from typing import Any

from prefixcap.cli.common import bounded
from prefixcap.engine.families import FAMILIES
from prefixcap.model.config import MAPPER_KINDS, CaptionConfig, mapper_option_help
from prefixcap.system.extras import require
from prefixcap.training.config import (
    BEST_METRICS,
    BOUNDS,
    CAPTION_MODES,
    MAPPER_SIZE_FIELDS,
    OBJECTIVES,
    PRECISIONS,
    RENAMED,
    SCHEDULES,
    SCST_BASELINES,
    SCST_REWARDS,
    TrainConfig,
    field_kind,
)

DEFAULTS = TrainConfig()
CONFIG_DEFAULTS = {name: value for name, value in vars(CaptionConfig()).items() if value is not None}
_OPTION_NAMES = frozenset(TrainConfig.__dataclass_fields__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a caption model on a feature store",
        description="Train a prefix mapper (and optionally the decoder) on the image embeddings and "
        "captions of a feature store. Writes RUN_DIR/best and RUN_DIR/last (model folders that "
        "`prefixcap caption --model` loads), metrics.csv, curves.png and TensorBoard logs. "
        "Options may also come from --config FILE (YAML or JSON, keys as below without the dashes); "
        "command-line flags win. Data-parallel: `accelerate launch -m prefixcap train ...`.",
    )
    add = _adder(parser)
    add("features", nargs="?", metavar="FEATURES", help="feature store folder written by `prefixcap prepare`")
    add("--out", metavar="RUN_DIR", help="folder for checkpoints and logs")
    add("--config", dest="config_file", metavar="FILE", help="YAML or JSON file of options (flags win)")
    add(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in RUN_DIR from RUN_DIR/last exactly where it stopped, with the run's own options "
        "(FEATURES and the other options may be left out; given ones must match)",
    )
    add(
        "--overwrite",
        action="store_true",
        default=False,
        help="start afresh in a RUN_DIR that holds an earlier run, deleting that run's checkpoints and logs "
        "(a folder that is not a run folder is always refused)",
    )

    model = parser.add_argument_group("model")
    add = _adder(model)
    add("--decoder", metavar="ID_OR_DIR", help="causal LM to start from: hub id or folder")
    add("--mapper", choices=MAPPER_KINDS, help="prefix mapper")
    add("--prefix-length", metavar="K", help="prefix embeddings per image")
    for name in MAPPER_SIZE_FIELDS:  # the model config's mapper sizes
        default = CONFIG_DEFAULTS.get(name)
        earlier = [_flag(old) for old, new in RENAMED.items() if new == name]  # --mapper-layers still works
        add(_flag(name), *earlier, dest=name, metavar="N", help=mapper_option_help(name) + (f" (default {default})"
            if default else ""))  # fmt: skip
    add("--freeze", metavar="MODE", help="frozen: train the mapper only (ClipCap); none: train everything; "
        "first:N: freeze the decoder's embeddings and first N blocks (e.g. first:10 of GPT-2's 12); lora: train the mapper "
        "and LoRA adapters on the decoder (needs peft: pip install 'prefixcap[lora]')")  # fmt: skip
    add("--lora-rank", metavar="R", help="--freeze lora: the rank of each adapter")
    add("--lora-alpha", metavar="ALPHA", help="--freeze lora: adapter scale numerator; the scale is ALPHA / R "
        "(default: twice R)")  # fmt: skip
    add("--lora-targets", metavar="NAMES", help="--freeze lora: comma-separated names of the decoder modules to "
        f"adapt (default: every linear layer of the blocks: {_default_lora_targets()})")  # fmt: skip

    optim = parser.add_argument_group("optimisation")
    add = _adder(optim)
    add("--epochs", metavar="N", help="passes over the training set")
    add("--batch-size", metavar="N", help="captions per process per step (x processes x --grad-accum in all)")
    add("--lr", help="peak learning rate (AdamW)")
    add("--warmup", metavar="W", help="warm-up: a fraction of all steps if < 1, else a number of steps")
    add("--lr-schedule", choices=SCHEDULES, help="decay after warm-up")
    add("--weight-decay", metavar="X", help="AdamW weight decay of weight matrices")
    add("--grad-accum", metavar="N", help="micro-batches accumulated per optimizer step")
    add("--max-grad-norm", metavar="X", help="clip the gradient norm to X (0: no clipping)")
    add("--compile", action="store_true", help="torch.compile the model: faster steps on GPUs after a slow first few")
    add("--precision", choices=PRECISIONS, help="bf16/fp16 autocast or fp32 (default: bf16 on a CUDA GPU, else fp32)")
    add(
        "--seed",
        metavar="S",
        help="random seed: the same seed gives the same initial weights, data order, caption choice and dropout",
    )

    data = parser.add_argument_group("data")
    add = _adder(data)
    add(
        "--captions-per-image",
        choices=CAPTION_MODES,
        help="per epoch, every (image, caption) pair, or one random caption per image",
    )
    add(
        "--max-caption-tokens", metavar="N",
        help="longest target in tokens, EOS included; longer captions are cut "
        "(default: long enough for 99%% of the training captions)",
    )  # fmt: skip
    add(
        "--prompt", metavar="TEXT",
        help="text that every caption continues, e.g. 'a photo of': the model learns the captions given image + "
        "prompt, and uses the prompt by default when captioning (default: each record's own 'prompt', if any)",
    )  # fmt: skip

    retrieval = parser.add_argument_group(
        "retrieval augmentation (SmallCap)",
        "put the captions of similar images, found in a caption datastore, in each image's prompt; the model "
        "then captions with any datastore (`caption --datastore`), e.g. one of another domain or house style",
    )
    add = _adder(retrieval)
    add("--datastore", metavar="DS", help="caption datastore (`prefixcap datastore build`) embedded with the feature "
        "store's CLIP; each training image retrieves from it, its own captions left out (by image id, else by "
        "caption text)")  # fmt: skip
    add("--retrieve-k", metavar="K", help="captions retrieved per image")
    add("--retrieval-template", metavar="TEXT", help="the prompt, with {captions} where the retrieved captions go "
        "(default: 'Similar images show {captions} This image shows')")  # fmt: skip
    add("--retrieval-prompt-tokens", metavar="N", help="most decoder tokens of a prompt, at most half the positions "
        "after the prefix: whole captions, best first, while they fit")  # fmt: skip
    add("--prefix-dropout", metavar="P", help="the chance that a training caption is learned without its image, "
        "from the retrieved captions alone, so that the model follows them, also another domain's datastore when "
        "captioning")  # fmt: skip

    scst = parser.add_argument_group(
        "self-critical sequence training",
        "fine-tune a trained model on a reward of its own sampled captions: --init MODEL --objective scst",
    )
    add = _adder(scst)
    add("--objective", choices=OBJECTIVES, help="xent: cross-entropy on the references; scst: self-critical sequence "
        "training (needs --init; --batch-size then counts images)")  # fmt: skip
    add("--init", metavar="MODEL", help="start from this trained model: a model folder, registered name or hub id "
        "(e.g. RUN_DIR/best of a cross-entropy run); its encoder must be the feature store's")  # fmt: skip
    add("--reward", choices=SCST_REWARDS, help="scst reward: CIDEr-D against the image's training references, "
        "CLIP-S (needs a full CLIP with the captioner's image tower), or their weighted sum")  # fmt: skip
    add("--samples-per-image", metavar="K", help="scst: captions sampled per image per step")
    add("--baseline", choices=SCST_BASELINES, help="scst: mean: the mean reward of the image's other samples "
        "(Luo 2020); greedy: the reward of its greedy caption (Rennie 2017)")  # fmt: skip
    add("--max-new-tokens", metavar="N", help="scst: longest sampled caption in tokens (default: the training "
        "targets' length, --max-caption-tokens)")  # fmt: skip
    add("--reward-clip", metavar="MODEL", help="scst: full CLIP (hub id or folder) for the clipscore reward; its "
        "image tower must be the captioner's encoder (default: the encoder's own CLIP)")  # fmt: skip
    add("--reward-weights", metavar="W_CIDER,W_CLIP", help="scst cider+clipscore: the weights of CIDEr-D and "
        "CLIP-S in the reward")  # fmt: skip

    validation = parser.add_argument_group("validation, checkpoints and logs")
    add = _adder(validation)
    add(
        "--val-images",
        metavar="N",
        help="val images captioned (greedy) for BLEU-4 and CIDEr-D after each epoch",
    )
    add("--best-metric", choices=BEST_METRICS, help="what chooses RUN_DIR/best (loss: the lowest val loss)")
    add("--save-every", metavar="N", help="also checkpoint RUN_DIR/last every N steps (0: at epoch ends only)")
    add("--log-every", metavar="N", help="steps between train-loss points in the progress bar and TensorBoard")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require("train", feature="prefixcap train")
    from prefixcap.training import resolve_config
    from prefixcap.training.trainer import Trainer

    options = {name: value for name, value in vars(args).items() if name in _OPTION_NAMES}
    config, given = resolve_config(options, args.config_file)
    Trainer(config, resume=args.resume, overwrite=args.overwrite, given=given).fit()
    return 0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_lora_targets() -> str:
    """Each decoder family's default LoRA targets, as the help lists them (families that share
    them together): "c_attn,c_proj,c_fc for gpt2; q_proj,... for llama, qwen2, ..."."""
    families: dict[tuple[str, ...], list[str]] = {}
    for family in FAMILIES.values():
        families.setdefault(family.lora_targets, []).append(family.name)
    return "; ".join(f"{','.join(targets)} for {', '.join(names)}" for targets, names in families.items())


def _adder(group: Any):
    """`group.add_argument`, with default None (so that a config file can fill the option), the
    TrainConfig default appended to the help, and every numeric option checked against its field's
    BOUNDS by the one validator, which says what TrainConfig would."""

    def add(*flags: str, **kwargs: Any) -> None:
        name = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        if name in _OPTION_NAMES:
            kwargs.setdefault("default", None)
            if name in BOUNDS:
                kwargs["type"] = bounded({"int": int, "float": float}[field_kind(name)], bounds=BOUNDS[name], name=name)
            default = getattr(DEFAULTS, name)
            if default is not None:
                kwargs["help"] += f" (default: {default})"
        group.add_argument(*flags, **kwargs)

    return add
