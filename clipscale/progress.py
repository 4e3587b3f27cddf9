"""A progress bar over the run's optimizer steps rather than epochs.

Runs stop on `trainer.max_steps` with `max_epochs=-1`, so Lightning's per-epoch bar shows
meaningless epoch totals; this one counts steps from 0 (or the resumed step) to max_steps.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """TQDM bar `step k/max_steps` that carries on across epochs and resumes at the restored step."""

    def on_train_epoch_start(self, trainer, *_) -> None:
        """Keep one bar for the whole fit: (re)set it only when it does not count steps yet."""
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            self._show(trainer.global_step)
        bar.set_description("step")

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
