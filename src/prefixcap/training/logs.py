"""Run logs: `metrics.csv`, TensorBoard events and `curves.png`, all under RUN_DIR.

The CSV is rewritten from the full metric history after every epoch (atomically), so a resumed
run never duplicates or loses a row; the plot likewise, at most once a minute (drawing takes about
a second) and at the end. TensorBoard drops the events written after the checkpoint that a run
resumes from (`purge_step`).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from prefixcap.system.atomic import atomic_path, write_atomic

METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
TENSORBOARD_DIR = "tensorboard"
PLOT_INTERVAL_S = 60.0


def epoch_summary(row: dict[str, Any]) -> str:
    """An epoch's row of metrics.csv for its log line, e.g. "train_loss 2.3109, val_loss 2.4018,
    BLEU-4 0.0000, CIDEr 0.0125": fixed point, where 4 significant digits printed a near-zero
    BLEU-4 as 3.041e-18."""
    return ", ".join(f"{name} {value:.4f}" for name, value in row.items() if name not in ("epoch", "step", "lr"))


class RunLog:
    def __init__(self, run_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)
        self.plotted_at = -PLOT_INTERVAL_S  # time.monotonic() of the last plot

    def step(self, step: int, values: dict[str, float]) -> None:
        """Per-step values (train loss, learning rate; SCST: reward, baseline, the reward's and the
        sampling's shares of the step time) for TensorBoard."""
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def epoch(self, history: list[dict[str, Any]], *, last: bool = False) -> None:
        """Log the newest epoch of `history`; rewrite the CSV and (if due, or `last`) the curves."""
        latest = history[-1]
        for name, value in latest.items():
            if name not in ("epoch", "step") and value is not None:
                self.writer.add_scalar(f"epoch/{name}", value, latest["step"])
        self.writer.flush()
        write_atomic(self.run_dir / METRICS_CSV, _csv(history))
        if last or time.monotonic() - self.plotted_at >= PLOT_INTERVAL_S:
            plot_curves(history, self.run_dir / CURVES_PNG)
            self.plotted_at = time.monotonic()

    def close(self) -> None:
        self.writer.close()


def _csv(history: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(name for row in history for name in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return text.getvalue()


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Losses, caption metrics and, for SCST runs, the mean reward and baseline, by epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    panels = [(("train_loss", "val_loss"), "loss"), (("BLEU-4", "CIDEr"), "val metrics (x100)")]
    if any("reward" in row for row in history):  # an SCST run: its mean sampled reward and baseline
        panels.append((("reward", "baseline"), "SCST reward (train samples)"))
    figure, all_axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for axes, (names, title) in zip(all_axes, panels):
        for name in names:
            points = [(epoch, row.get(name)) for epoch, row in zip(epochs, history) if row.get(name) is not None]
            if points:
                axes.plot(*zip(*points), marker="o", label=name)
        axes.set(title=title, xlabel="epoch")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.tight_layout()
    with atomic_path(path) as staging:
        figure.savefig(staging, dpi=100, format="png")
    plt.close(figure)
