"""`<output_dir>/curves.png` at the end of a run: loss, temperature, validation and probe curves.

The numbers are collected in memory while training (the training metrics from Lightning's
`callback_metrics`, the validation ones from ValidationCallback's history), so the figure is the
same whichever logger (wandb, csv, tensorboard, none) the run uses.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from clipscale.eval.callback import ValidationCallback  # noqa: E402
from clipscale.metering import is_logging_step  # noqa: E402

TRAIN_KEYS = ("train/loss", "train/temperature")
# panel title -> suffixes of the validation keys drawn in it
VAL_PANELS = {
    "validation accuracy": ("top1", "R@1"),
    "modality gap and cosines": ("modality_gap", "matched_cosine", "unmatched_cosine"),
}


def curve_panels(keys) -> dict[str, list[str]]:
    """Panel title -> the metrics drawn in it, for the given metric names (empty panels left out)."""
    panels = {
        "loss": [k for k in keys if k in ("train/loss", "val/contrastive_loss")],
        "temperature": [k for k in keys if k == "train/temperature"],
    }
    for title, suffixes in VAL_PANELS.items():
        panels[title] = [k for k in keys if k.startswith("val/") and k.endswith(suffixes)]
    # the probe's accuracy per type and overall, each beside its chance level (drawn dashed)
    panels["compositional probe"] = [
        k for k in keys if k.startswith("val/compositional/") and not k.endswith("num_samples")
    ]
    return {title: chosen for title, chosen in panels.items() if chosen}


def plot_curves(series: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """Draw {metric: [(step, value), ...]} into the panels of curve_panels."""
    panels = curve_panels(series)
    if not panels:
        raise ValueError(f"nothing to plot: no train/ or val/ curves among {sorted(series)}")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels.items(), strict=True):
        for key in keys:
            steps, values = zip(*series[key], strict=True)
            style = "--" if key.endswith("_chance") else "-"
            axis.plot(steps, values, style, marker="o" if len(steps) < 30 else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.ticklabel_format(axis="y", style="plain", useOffset=False)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class CurvesCallback(Callback):
    """Record `train/loss` and `train/temperature` at every logging step (trainer.log_every_n_steps,
    when the module logs them: reading a value waits for the device, so not every step); write
    curves.png when fit ends."""

    def __init__(self, output_dir: str, filename: str = "curves.png"):
        self.path = Path(output_dir) / filename
        self.series: dict[str, list[tuple[int, float]]] = {key: [] for key in TRAIN_KEYS}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Take this step's training values from the metrics the module just logged."""
        if not trainer.is_global_zero or not is_logging_step(trainer):
            return
        logged = trainer.callback_metrics
        for key in TRAIN_KEYS:
            # a metric logged with on_epoch=True too appears as "<key>_step"
            value = logged.get(key, logged.get(f"{key}_step"))
            if value is not None:
                self.series[key].append((trainer.global_step, float(value)))

    def on_fit_end(self, trainer, pl_module) -> None:
        """After every callback's on_train_end (so the final validation is in): write the figure."""
        if not trainer.is_global_zero:
            return
        series = self._with_validation(trainer)
        if series:
            plot_curves(series, self.path)

    def _with_validation(self, trainer) -> dict[str, list[tuple[int, float]]]:
        """The recorded training curves plus the validation callback's points of this fit."""
        series = {key: list(points) for key, points in self.series.items() if points}
        for callback in trainer.callbacks:
            if isinstance(callback, ValidationCallback):
                for step, metrics in callback.history:
                    for key, value in metrics.items():
                        series.setdefault(key, []).append((step, value))
        return series

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Remember the trainer, so state_dict can fold this fit's validation points in."""
        self._trainer = trainer

    def state_dict(self) -> dict:
        """Every curve so far, so a resumed run's figure covers its whole history."""
        trainer = getattr(self, "_trainer", None)
        return {"series": self._with_validation(trainer) if trainer else dict(self.series)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the curves of the run being resumed."""
        self.series = {
            key: [tuple(p) for p in points] for key, points in state_dict["series"].items()
        }
        for key in TRAIN_KEYS:
            self.series.setdefault(key, [])
