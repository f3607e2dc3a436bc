"""The training loop: data-parallel through Accelerate, validation every epoch, checkpoints that
resume exactly.

Run layout:

    RUN_DIR/
      best/            model directory with the best validation score (`--best-metric`)
      last/            model directory of the latest checkpoint, plus training_state/
      metrics.csv      one row per epoch
      curves.png       loss and metrics by epoch
      tensorboard/     event files

`objective="scst"` fine-tunes an `init` model with self-critical sequence training instead
(training/scst.py): each step samples captions for a batch of images and trains on their rewards.

Exact resume: the epoch order is a function of (seed, epoch), the checkpoint holds the optimizer,
scheduler, scaler and every process's RNG states, and a resumed run skips the batches already
done in the checkpoint's epoch. With the same number of processes, a run resumed from any
checkpoint ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from prefixcap.errors import UserError
from prefixcap.model.caption_model import CaptionModel
from prefixcap.model.directory import MODEL_ENTRIES
from prefixcap.model.registry import resolve_model_dir
from prefixcap.pipeline.features import FeatureStore
from prefixcap.retrieval.training import TrainingRetrieval
from prefixcap.system.atomic import check_output_dir, foreign_entries, holds_only, replace_dir
from prefixcap.system.extras import require
from prefixcap.training.config import TrainConfig
from prefixcap.training.data import CaptionTargets, process_batches, record_prompts, trained_prompt
from prefixcap.training.logs import CURVES_PNG, METRICS_CSV, TENSORBOARD_DIR, RunLog, epoch_summary
from prefixcap.training.objective import CaptionLoss
from prefixcap.training.scst import SCSTLoss, SelfCritical, build_reward, reward_workers, window_metrics
from prefixcap.training.state import (
    JSON_FILE,
    STATE_DIR,
    Progress,
    TrainingState,
    capture_rng,
    damaged,
    load_training_state,
    restore_rng,
    save_training_state,
)
from prefixcap.training.step import (
    apply_freeze_policy,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    default_precision,
    train_step,
)

LAST, BEST = "last", "best"
RUN_ENTRIES = (BEST, LAST, METRICS_CSV, CURVES_PNG, TENSORBOARD_DIR)  # everything a run writes
CHECKPOINT_ENTRIES = {BEST: MODEL_ENTRIES, LAST: (*MODEL_ENTRIES, STATE_DIR)}  # and in its checkpoints
_METRIC_NAMES = {"cider": "CIDEr", "bleu4": "BLEU-4", "loss": "val_loss"}


class Trainer:
    """Trains a CaptionModel on a feature store; `Trainer(config).fit()`.

    A new run needs a new or empty RUN_DIR, or one of an earlier run that `overwrite` replaces;
    `resume` continues the run in RUN_DIR with its own options and feature store."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        given: dict[str, Any] | None = None,
    ):
        require("train", feature="training")
        from accelerate.utils import set_seed

        if config.out is None:
            raise UserError("give --out RUN_DIR (on the command line or in --config)")
        if resume and overwrite:
            raise UserError("--overwrite starts a new run and --resume continues one; pass one of them")
        self.run_dir = Path(config.out)
        state_dir = self.run_dir / LAST / STATE_DIR
        saved = load_training_state(state_dir) if resume else None
        if saved is not None:
            config = _resumed_config(saved.config, given or {}, state_dir)
        else:
            _check_new_run(self.run_dir, overwrite)
        if config.features is None:
            raise UserError("give the FEATURES folder (on the command line or in --config)")
        config = dataclasses.replace(
            config, features=str(Path(config.features).resolve()), precision=config.precision or default_precision(),
            datastore=config.datastore and str(Path(config.datastore).resolve()),
        )  # fmt: skip
        self.accelerator = build_accelerator(config)
        if config.precision == "fp16" and self.accelerator.device.type != "cuda":
            raise UserError("fp16 training needs a CUDA GPU; use --precision bf16 or fp32")
        set_seed(config.seed)

        # 1. The model, new or from the checkpoint, and which of its parts train.
        store = FeatureStore(config.features)
        if saved is not None:
            _check_same_store(store, saved, state_dir)
        self.store_identity = store.identity
        model = _load_model(config, store, self.run_dir / LAST if saved is not None else None)

        # 2. Targets, tokenised once; the train split fixes the caption length, within the decoder's positions.
        if "train" not in store.manifest.splits:
            raise UserError(f"{config.features}: no train split to train on")
        limit = self._caption_limit(model, config)
        train_records = store.records("train")
        if config.init and config.prompt is None and model.config.prompt and not any(r.prompt for r in train_records):
            # an --init model trained with a prompt continues it, in training (and SCST sampling) as when captioning
            config = dataclasses.replace(config, prompt=model.config.prompt)
        mmap = store.manifest.features == "patches"  # patch tokens may not fit in memory: read rows per batch
        train_embeds = store.embeddings("train", mmap=mmap)
        retrieval = None
        if config.datastore is not None:
            retrieval = TrainingRetrieval.open(
                config.datastore, model, k=config.retrieve_k, template=config.retrieval_template,
                prompt_tokens=config.retrieval_prompt_tokens,
            )  # fmt: skip
        if retrieval is not None:
            train_records = retrieval.records(train_records, train_embeds, retrieval.max_tokens, self._say)
        elif model.config.uses_retrieval:
            raise UserError(f"--init {config.init} was trained with retrieval; give its --datastore DS too")
        self.train_set = CaptionTargets.build(
            train_records, train_embeds, model.tokenizer, config.max_caption_tokens, limit, config.prompt
        )
        # captioning's default prompt: the one the model learned to continue
        model.config.prompt = trained_prompt(record_prompts(train_records, config.prompt))
        if retrieval is not None:  # each image its own prompt: the model records how they are made instead
            retrieval.record(model.config)
        config = dataclasses.replace(config, max_caption_tokens=self.train_set.max_tokens)
        self.scst = None if config.objective != "scst" else self._self_critical(model, config, train_records)
        self.val_records = store.records("val") if "val" in store.manifest.splits else []
        self.val_set = None
        if not self.val_records:
            self._say(
                f"note: {config.features} has no val split, so there is no validation and no {self.run_dir / BEST}"
            )
        elif config.val_images == 0 and config.best_metric != "loss":
            raise UserError(
                f"--best-metric {config.best_metric} needs captions: set --val-images above 0, or --best-metric loss"
            )
        else:
            val_embeds = store.embeddings("val", mmap=mmap)
            if retrieval is not None:  # prompts that leave the val captions the positions the train ones have
                room = min(retrieval.max_tokens, limit - self.train_set.max_tokens) if limit else retrieval.max_tokens
                self.val_records = retrieval.records(self.val_records, val_embeds, room, self._say)
            self.val_set = CaptionTargets.build(
                self.val_records, val_embeds, model.tokenizer, config.max_caption_tokens, prompt=config.prompt
            )
        self.config = config

        # 3. Optimizer and schedule; then everything onto the device(s).
        self.steps_per_epoch = math.ceil(len(self._process_batches(0)) / config.grad_accum)
        total_steps = self.steps_per_epoch * config.epochs
        self.optimizer = build_optimizer(model.to(self.accelerator.device), config, self.accelerator.device)
        self.scheduler = build_scheduler(self.optimizer, config, total_steps)
        self.model = model  # the CaptionModel: validated, saved
        objective = SCSTLoss(model) if self.scst is not None else CaptionLoss(model, config.prefix_dropout)
        self.objective, self.optimizer = self.accelerator.prepare(objective, self.optimizer)  # trained
        self.progress = Progress() if saved is None else saved.progress
        if saved is not None:
            self._restore(saved, state_dir)
        elif overwrite:
            self._clear_run()
        self._describe(model, total_steps)
        self.log = RunLog(self.run_dir, purge_step=self.progress.step) if self.accelerator.is_main_process else None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Progress:
        """Train the remaining epochs; returns the progress (history, best score)."""
        progress = self.progress
        while progress.epoch < self.config.epochs:
            self._train_epoch()
            metrics = self._validate() if self.accelerator.is_main_process else {}
            improved = self._record_epoch(metrics)
            self._checkpoint(best=improved)
        if self.log is not None:
            self.log.close()
            best = progress.best
            if best is not None:
                name = _METRIC_NAMES[self.config.best_metric]
                self._say(f"best {name} {best:.4f} after epoch {progress.best_epoch}: {self.run_dir / BEST}")
        self.accelerator.end_training()
        return progress

    def _train_epoch(self) -> None:
        config, progress, accelerator = self.config, self.progress, self.accelerator
        batches = self._process_batches(progress.epoch)
        steps = [batches[i : i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
        self._train_mode()
        window_loss = torch.zeros((), device=accelerator.device)  # summed step losses since the last report
        window_steps, window_samples, window_start = 0, 0, time.perf_counter()
        bar = tqdm(
            total=len(steps), initial=progress.epoch_step, desc=f"epoch {progress.epoch + 1}/{config.epochs}",
            unit="step", file=sys.stderr, disable=not accelerator.is_main_process or None,
        )  # fmt: skip
        for step in steps[progress.epoch_step :]:
            if self.scst is not None:  # sampled captions: a function of (seed, step, process)
                images = [self.train_set.image_of[indices] for indices in step]
                micro_batches = self.scst.step_batches(images, (config.seed, progress.step, accelerator.process_index))
            else:
                micro_batches = [self.train_set.batch(indices) for indices in step]
            loss = train_step(
                self.objective, self.optimizer, self.scheduler, accelerator, micro_batches, config.max_grad_norm
            )
            window_loss += loss
            window_steps += 1
            window_samples += sum(len(indices) for indices in step) * accelerator.num_processes
            progress.epoch_step += 1
            progress.step += 1
            bar.update()
            last_step = progress.epoch_step == len(steps)
            checkpoint = config.save_every and progress.step % config.save_every == 0 and not last_step
            if progress.step % config.log_every == 0 or last_step or checkpoint:
                # Report, and move the loss into the progress: one device sync per report, not per step.
                window_total = window_loss.item()
                mean_loss = window_total / window_steps
                progress.loss_sum += window_total
                progress.loss_steps += window_steps
                seconds = time.perf_counter() - window_start
                rate = window_samples / seconds
                scst = {} if self.scst is None else self.scst.report(seconds, progress.sums)
                bar.set_postfix(
                    loss=f"{mean_loss:.4f}", samples_per_s=f"{rate:,.0f}", **{k: f"{v:.3g}" for k, v in scst.items()}
                )
                if self.log is not None:
                    self.log.step(progress.step, {"loss": mean_loss, "lr": self.scheduler.get_last_lr()[0], **scst})
                window_loss.zero_()
                window_steps, window_samples, window_start = 0, 0, time.perf_counter()
            if checkpoint:
                self._checkpoint(best=False)
        bar.close()

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Val loss over every val caption, and BLEU-4 / CIDEr-D of greedy captions for the
        first `val_images` val images (pycocoevalcap scorers on simply tokenised text, no Java)."""
        from prefixcap.evaluation.coco_metrics import coco_scores

        if self.val_set is None:
            return {}
        model, objective, config = self.model, self.accelerator.unwrap_model(self.objective), self.config
        model.eval()
        metrics: dict[str, float] = {}
        with self.accelerator.autocast():
            loss_sum = tokens = 0.0
            for start in range(0, len(self.val_set), config.batch_size):
                batch = self.val_set.batch(np.arange(start, min(start + config.batch_size, len(self.val_set))))
                batch = {name: tensor.to(self.accelerator.device) for name, tensor in batch.items()}
                count = int((batch["labels"] != -100).sum())
                loss_sum += CaptionLoss.forward(objective, **batch).item() * count  # cross-entropy, also for SCST
                tokens += count
            metrics["val_loss"] = loss_sum / tokens
            records = self.val_records[: config.val_images]  # val_set.embeds rows follow this order
            prompts = record_prompts(records, config.prompt)  # "" for none, not the model's default
            predictions = {}
            for start in range(0, len(records), config.batch_size):
                embeds = self.val_set.embeds[start : min(start + config.batch_size, len(records))]
                captions = model.caption(
                    image_embeds=embeds.to(self.accelerator.device),
                    prompt=prompts[start : start + len(embeds)],
                    max_new_tokens=config.max_caption_tokens,
                )
                for record, per_image in zip(records[start:], captions):
                    predictions[record.image_id] = per_image[0]
        if predictions:
            references = {record.image_id: list(record.captions) for record in records}
            scores = coco_scores(predictions, references, java=False, metrics=("bleu", "cider")).corpus
            metrics.update({"BLEU-4": scores["BLEU-4"], "CIDEr": scores["CIDEr"]})
        self._train_mode()
        return metrics

    def _record_epoch(self, metrics: dict[str, float]) -> bool:
        """Close the epoch in the progress and the logs; whether it is the best so far."""
        progress = self.progress
        progress.epoch += 1
        row = {
            "epoch": progress.epoch, "step": progress.step,
            "train_loss": progress.loss_sum / max(1, progress.loss_steps),
            "lr": self.scheduler.get_last_lr()[0], **metrics,
        }  # fmt: skip
        if self.scst is not None:  # the epoch's mean reward and baseline, and the reward's share of the time
            row.update(window_metrics(progress.sums))
        progress.history.append(row)
        progress.epoch_step, progress.loss_sum, progress.loss_steps, progress.sums = 0, 0.0, 0, {}
        score = metrics.get(_METRIC_NAMES[self.config.best_metric])
        lower_is_better = self.config.best_metric == "loss"
        improved = score is not None and (
            progress.best is None or (score < progress.best if lower_is_better else score > progress.best)
        )
        if improved:
            progress.best, progress.best_epoch = score, progress.epoch
        if self.log is not None:
            self.log.epoch(progress.history, last=progress.epoch == self.config.epochs)
            self._say(f"epoch {progress.epoch}/{self.config.epochs}: {epoch_summary(row)}")
        return improved

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, *, best: bool) -> None:
        """Write RUN_DIR/last (model + training state) and, if `best`, RUN_DIR/best. Every process
        contributes its RNG state; only the main process writes."""
        from accelerate.utils import gather_object

        rng_states = gather_object([capture_rng()])
        if self.accelerator.is_main_process:
            if best:
                self.model.save_pretrained(self.run_dir / BEST, keep_foreign=True)  # a user's eval/ in it stays
            state = TrainingState(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
                rng=rng_states,
                progress=self.progress,
                config=self.config.to_dict(),
                store=self.store_identity,
            )
            save_checkpoint(self.run_dir / LAST, self.model, state)
        self.accelerator.wait_for_everyone()

    def _restore(self, saved: TrainingState, state_dir: Path) -> None:
        """Continue from `saved`; state that does not fit this run is an error naming `state_dir`."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if len(saved.rng) != world:
            raise UserError(f"{self.run_dir} ran on {len(saved.rng)} processes; resume it on as many (not {world})")
        try:
            self.optimizer.load_state_dict(saved.optimizer)
            self.scheduler.load_state_dict(saved.scheduler)
            if saved.scaler is not None and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(saved.scaler)
            restore_rng(saved.rng[rank])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise damaged(state_dir, error) from None

    def _clear_run(self) -> None:
        """Delete the earlier run in RUN_DIR (`overwrite`): `_check_new_run` made sure that the
        folder holds nothing else. Every process has looked at it before the main one deletes."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process and self.run_dir.is_dir():
            for entry in self.run_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ helpers
    def _process_batches(self, epoch: int) -> list[np.ndarray]:
        per_image = "one" if self.config.objective == "scst" else self.config.captions_per_image  # SCST: images
        order = self.train_set.epoch_order(per_image, self.config.seed, epoch)
        return process_batches(
            order, self.config.batch_size, self.accelerator.process_index, self.accelerator.num_processes
        )

    def _train_mode(self) -> None:
        if self.scst is not None:  # no dropout: the gradient is that of the policy that sampled (scst.py)
            self.objective.eval()
            return
        self.objective.train()
        self.model.vision_encoder.eval()  # unused while training on stored features
        if self.model.config.freeze_decoder:  # a frozen decoder is a fixed function: no dropout (as ClipCap)
            self.model.decoder.eval()

    def _describe(self, model: CaptionModel, total_steps: int) -> None:
        config, data = self.config, self.train_set
        per_step = config.batch_size * self.accelerator.num_processes * config.grad_accum
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        cut = f"{data.num_cut} of {len(data)} training captions ({data.num_cut / max(1, len(data)):.2%}) cut"
        self._say(
            f"train: {data.num_images} images, {len(data)} captions; max caption length "
            f"{config.max_caption_tokens} tokens incl. EOS, {cut}\n"
            f"{self.steps_per_epoch} steps per epoch of {per_step} captions ({config.batch_size} x "
            f"{self.accelerator.num_processes} processes x {config.grad_accum} accumulated), {total_steps} steps; "
            f"{trainable:,} of {total:,} parameters train (--freeze {config.freeze}); precision {config.precision}"
            + (f"; resuming after step {self.progress.step}" if self.progress.step else "")
            + (f"\n{self.scst.describe()}; the steps above count images, not captions" if self.scst else "")
        )

    def _caption_limit(self, model: CaptionModel, config: TrainConfig) -> int | None:
        """The longest target the decoder takes after the prefix (None: no limit), with a note
        when --max-caption-tokens asks for more."""
        limit = model.max_new_tokens_limit  # (a model whose prefix leaves no room is refused when built)
        if limit is not None and config.max_caption_tokens is not None and config.max_caption_tokens > limit:
            self._say(
                f"note: --max-caption-tokens {config.max_caption_tokens} is capped to {limit}: the decoder has "
                f"{limit + model.config.prefix_length} positions and the prefix takes {model.config.prefix_length}"
            )
        return limit

    def _self_critical(self, model: CaptionModel, config: TrainConfig, records: list) -> SelfCritical:
        """The SCST sampler and reward for the training `records`."""
        max_new_tokens = config.max_new_tokens or self.train_set.max_tokens  # default: the targets' length
        longest_prompt = self.train_set.ids.shape[1] - self.train_set.max_tokens
        fits = None if model.max_new_tokens_limit is None else model.max_new_tokens_limit - longest_prompt
        if fits is not None and max_new_tokens > fits:
            raise UserError(f"--max-new-tokens {max_new_tokens}: only {fits} tokens fit after the prefix and prompt")
        return SelfCritical(
            model,
            build_reward(
                config, model, records, self.train_set.embeds, workers=reward_workers(self.accelerator.num_processes)
            ),
            self.train_set.embeds, record_prompts(records, config.prompt),
            samples_per_image=config.samples_per_image, baseline=config.baseline, max_new_tokens=max_new_tokens,
            reward_name=config.reward,
        )  # fmt: skip

    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message, file=sys.stderr)


def _load_model(config: TrainConfig, store: FeatureStore, checkpoint: Path | None) -> CaptionModel:
    """A new model on the store's encoder, or the checkpoint's; frozen as `config.freeze` says.
    With `--freeze lora` a LoRA model's adapter stays separate and continues training; otherwise
    it is merged into the decoder, which then trains as a whole."""
    merge = config.freeze != "lora"
    if checkpoint is not None:
        model = CaptionModel.from_pretrained(checkpoint, merge_adapter=merge)
    elif config.init is not None:  # a trained model to fine-tune (SCST, or more cross-entropy)
        model = CaptionModel.from_pretrained(resolve_model_dir(config.init), merge_adapter=merge)
    else:
        model = CaptionModel.from_components(
            vision_encoder=store.encoder, freeze_decoder=config.freeze == "frozen", **config.model_options
        )
    store.check_encoder(model.config, model.image_processor)
    apply_freeze_policy(model, config)  # the same for every way in (new, --init, resumed)
    return model


def _check_new_run(run_dir: Path, overwrite: bool) -> None:
    """A new run writes into a new or empty folder, or replaces an earlier run with `overwrite`;
    it never writes into (or deletes) a folder that holds anything else."""
    if (run_dir / LAST).is_dir() and is_run_dir(run_dir) and not overwrite:
        raise UserError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to start it afresh, "
            "or choose another --out"
        )
    check_output_dir(run_dir, what="prefixcap training run", is_ours=is_run_dir, overwrite=overwrite)
    for name, entries in CHECKPOINT_ENTRIES.items():
        checkpoint = run_dir / name
        foreign = foreign_entries(checkpoint, entries) if checkpoint.is_dir() and not checkpoint.is_symlink() else []
        if foreign:  # checkpoints keep what a user puts in them, and so must --overwrite
            raise UserError(
                f"{checkpoint}: holds {', '.join(foreign)}, which the run did not write; --overwrite would delete it "
                "(move it elsewhere first, or choose another --out)"
            )


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds nothing but the files of a training run."""
    return holds_only(path, RUN_ENTRIES)


def _resumed_config(saved: dict[str, Any], given: dict[str, Any], state_dir: Path) -> TrainConfig:
    """The run's own options; options given again must agree with them. FEATURES may name the
    run's feature store in another folder (`_check_same_store` makes sure it is the same one)."""
    try:
        config = TrainConfig.from_stored({**saved, "features": given.get("features", saved["features"])})
    except (KeyError, TypeError, UserError) as error:
        raise damaged(state_dir / JSON_FILE, error) from None
    for name, value in given.items():
        if name not in ("features", "out") and getattr(config, name) != value:
            flag = "--" + name.replace("_", "-")
            ours = getattr(config, name)
            raise UserError(f"{flag} {value} differs from the resumed run's {ours}; a resumed run keeps its options")
    return config


def _check_same_store(store: FeatureStore, saved: TrainingState, state_dir: Path) -> None:
    """A resumed run must read the feature store it started on, perhaps moved: other data would
    change what it learns, and the length of its LR schedule, mid-run. Runs saved before stores
    had an identity are checked by the folder."""
    started_on = saved.config["features"]
    same = store.identity == saved.store if saved.store else str(store.path.resolve()) == started_on
    if not same:
        raise UserError(
            f"FEATURES {store.path} is not the feature store the resumed run trains on ({started_on}, "
            f"recorded in {state_dir}); a resumed run keeps its options"
        )


def save_checkpoint(directory: Path, model: CaptionModel, state: TrainingState) -> None:
    """Write a model directory plus its training_state/, then swap it into place, so that
    `directory` always holds one complete checkpoint. What else a user put there stays."""
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving (only ever ours)
    model.save_pretrained(staging)
    save_training_state(staging / STATE_DIR, state)
    replace_dir(staging, directory, ours=CHECKPOINT_ENTRIES[LAST])
