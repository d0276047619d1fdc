"""The progress bar of a run: Lightning's rich bar, described by its step budget when the run is step-limited."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """On a step-limited run (max_epochs -1) Lightning's bar reads "Epoch 19/-2"; this one reads "Epoch 19 · to step
    500". Lightning has no public hook for the text, so this overrides the method that makes it."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps > 0 and trainer.max_epochs in (None, -1):
            return f"Epoch {current_epoch} · to step {trainer.max_steps}"
        return super()._get_train_description(current_epoch)
