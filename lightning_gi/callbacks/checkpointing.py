"""Checkpoints that are never truncated: written to a temporary file next to the target, then renamed.

Lightning's ``TorchCheckpointIO`` opens the final path and streams into it, so a full disk or a kill in
the middle leaves a truncated ``epoch=0-step=60.ckpt`` whose name looks valid. :class:`AtomicCheckpointIO`
writes ``<name>.partial-<pid>`` in the same directory (same filesystem), flushes it to disk and
``os.replace``s it over the target: a reader sees either the old file or the complete new one.
:class:`PeriodicCheckpoint` is the ``ModelCheckpoint`` the CLI adds to every run (``save_last=True``,
every ``every_n_train_steps`` steps, into ``<run dir>/checkpoints``) so that a killed run can be resumed
with ``--ckpt_path <run dir>/checkpoints/last.ckpt``.
"""
from __future__ import annotations

import io
from typing import Any, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from ..files import PARTIAL_MARK, write_atomic  # noqa: F401 (the one atomic writer; PARTIAL_MARK re-exported)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` never leaves a partial file under the final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(buffer.getvalue(), path)


class PeriodicCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` for attacks: ``last.ckpt`` every ``every_n_train_steps`` steps and at the end.

    Attacks have no validation metric, so only the latest state is kept (``save_top_k=0`` + ``save_last``).
    """

    def __init__(self, every_n_train_steps: int = 50, dirpath: Optional[str] = None) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    def _save_final(self, trainer: Any) -> None:
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The final state is always checkpointed, also when max_steps is not a multiple of the period."""
        self._save_final(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """An interrupted run (Ctrl+C, SIGTERM, an error) keeps its latest state in ``last.ckpt``."""
        try:
            self._save_final(trainer)
        except Exception as err:  # never mask the original exception
            import warnings

            warnings.warn(f"could not write last.ckpt after {type(exception).__name__}: {err}", stacklevel=2)
