"""Divergence guard: a NaN/inf loss must not silently poison an attack.

L-BFGS and large learning rates can drive the dummies to NaN (DLG does, on some seeds). Every
``check_every_n_steps`` steps the guard checks the last loss and the unknowns; on a non-finite value it
restores the last good snapshot of the unknowns, clears the optimiser state, and goes on. After
``max_restores`` restores it stops the run with a message naming the step. The best iterate is never
lost: non-finite distances never replace it (see ``GradientInversionAttack.update_best``).
"""
from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn


class DivergenceGuard(pl.Callback):
    """Detect non-finite losses/unknowns, restore the last good state, stop after too many restores.

    Args:
        check_every_n_steps: how often to check (each check costs one host sync).
        snapshot_every_n_steps: how often to snapshot the unknowns when they are finite.
        max_restores: restores allowed before the run stops.
    """

    def __init__(self, check_every_n_steps: int = 1, snapshot_every_n_steps: int = 10, max_restores: int = 3) -> None:
        if check_every_n_steps < 1 or snapshot_every_n_steps < 1 or max_restores < 0:
            raise ValueError("check_every_n_steps and snapshot_every_n_steps must be >= 1, max_restores >= 0")
        self.check_every_n_steps = check_every_n_steps
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.max_restores = max_restores
        self.restores = 0
        self.events: list[dict[str, Any]] = []
        self._snapshot: Optional[list[torch.Tensor]] = None
        self._snapshot_step = 0

    @staticmethod
    def _unknowns(pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snapshot = [p.detach().clone() for p in self._unknowns(pl_module)]
        self._snapshot_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.check_every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        params = self._unknowns(pl_module)
        finite = bool(torch.isfinite(loss).all()) if isinstance(loss, torch.Tensor) else True
        finite = finite and all(bool(torch.isfinite(p).all()) for p in params)
        if getattr(pl_module, "shard", None) is not None:  # lightning_gi.distributed: ranks decide together
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            if step - self._snapshot_step >= self.snapshot_every_n_steps:
                self._snapshot = [p.detach().clone() for p in params]
                self._snapshot_step = step
            return
        self.events.append({"step": step, "restored_to": self._snapshot_step})
        with torch.no_grad():
            for p, s in zip(params, self._snapshot):
                p.copy_(s)
        if self.restores >= self.max_restores:
            rank_zero_warn(
                f"DivergenceGuard: non-finite loss or unknowns at step {step} after {self.restores} restores; "
                f"stopping. The best iterate so far (matching distance {float(pl_module.best_loss):.4g}) is kept."
            )
            trainer.should_stop = True
            return
        self.restores += 1
        rank_zero_warn(
            f"DivergenceGuard: non-finite loss or unknowns at step {step}; restored the unknowns of step "
            f"{self._snapshot_step} and reset the optimiser state (restore {self.restores}/{self.max_restores})."
        )
        for opt in trainer.optimizers:
            opt.state.clear()
