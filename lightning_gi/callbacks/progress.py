"""The progress bar of an attack: one endless epoch whose length is ``trainer.max_steps`` optimiser steps.

Lightning's rich bar labels its row ``Epoch {epoch}/{max_epochs - 1}``, which reads ``Epoch 0/-2`` for the
endless epoch an attack runs in (``max_epochs=-1``). :class:`AttackProgressBar` labels it ``Attack`` instead;
the counter next to it (``300/300``) is already the step budget. The CLI swaps it in for Lightning's default
rich bar; a bar a config lists itself is left alone.
"""
from __future__ import annotations

from pytorch_lightning.callbacks import RichProgressBar


class AttackProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` with the row labelled ``Attack`` (steps), not ``Epoch 0/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "Attack"


__all__ = ["AttackProgressBar"]
