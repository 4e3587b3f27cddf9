"""A progress bar over the run's optimizer steps rather than epochs.

Runs stop on `trainer.max_steps` with `max_epochs=-1`, so Lightning's per-epoch bar shows
meaningless epoch totals; this one counts steps from 0 (or the resumed step) to max_steps.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """TQDM bar `step k/max_steps` that carries on across epochs and resumes at the restored step."""

    @property
    def train_description(self) -> str:
        """The title of the training bar."""
        return "step"

    def on_train_start(self, trainer, pl_module) -> None:
        """Make Lightning's bar count optimizer steps, from the step the run starts at (0, or the
        restored step: a run resumed mid-epoch gets no on_train_epoch_start before its steps)."""
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        self._show(trainer.global_step)

    def on_train_epoch_start(self, trainer, *_) -> None:
        """Keep the one bar of the whole fit (Lightning's would restart it at every epoch)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Advance to the trainer's step count."""
        if self._should_update(trainer.global_step, trainer.max_steps):
            self._show(trainer.global_step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        """The logged progress-bar metrics without the logger's version number."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _show(self, step: int) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = step
            bar.refresh()
