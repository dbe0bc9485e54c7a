"""Divergence guard and start-of-run checks: an attack must not run to the end on input that cannot work,
nor silently on NaNs.

Before step 0 (``on_train_start``) the guard checks that

- the unknowns are finite (a resumed checkpoint may hold NaN unknowns): :class:`DivergenceError`;
- the victim's output on the dummy batch is finite (a victim that returns NaN, even behind a
  ``torch.where``, gives zero or NaN gradients and a random "reconstruction"): :class:`VictimOutputError`;
- the observed gradient is not all zero (e.g. ``TopKPruning(1.0)``): an all-zero target carries no
  information about the data, :class:`UninformativeObservationError`;
- the victim's gradient on the dummy batch is finite and not all zero (else the matching distance has no
  gradient with respect to the unknowns and the optimiser cannot move): :class:`VictimOutputError`.

During the run, every ``check_every_n_steps`` steps it checks the last loss and the unknowns; on a non-finite
value it restores the last finite snapshot of the unknowns (snapshots are taken only at checks that found
everything finite, so checking less often never restores a bad state), clears the optimiser state and goes on.
On CUDA the check does not block the host (``check_mode="auto"``): the finiteness flag is computed on the device
and copied to pinned host memory asynchronously, and it is read at a later check once the device has produced
it (usually the next one), so the step never waits for the device; a divergence is then acted on one check
later. Elsewhere (CPU: no device to wait for) each check is read at once. After ``max_restores`` consecutive restores (no new finite snapshot
in between) it raises :class:`DivergenceError`, so the CLI exits non-zero; ReconstructionReport still
writes the best iterate, which never contains a non-finite value (``GradientInversionAttack.update_best``).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from ..observation import ObservationError, forward_keeping_buffers


class DivergenceError(RuntimeError):
    """The attack's unknowns or loss became non-finite and could not be recovered."""


class UninformativeObservationError(ObservationError):
    """The observed gradient carries no information (all zero)."""


class VictimOutputError(RuntimeError):
    """The victim's output or gradient on the dummy batch is unusable (non-finite or all zero)."""


def _all_zero(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([t.detach().abs().amax() if t.numel() else t.new_zeros(()) for t in tensors]).amax() == 0)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One host sync for the whole list."""
    return bool(_finite_flag(tensors))


def _finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor on the tensors' device: every entry of every tensor is finite (no host sync)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.numel()]
    if not flags:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)
    return torch.stack(flags).all()


class _PendingCheck:
    """A check whose device flag has not been read yet: the flag copied to (pinned) host memory, a CUDA event that
    completes when the copy has landed (None off CUDA), and the unknowns cloned for a snapshot if one was due."""

    def __init__(self, step: int, flag: torch.Tensor, candidate: Optional[list[torch.Tensor]]) -> None:
        self.step = step
        self.candidate = candidate
        if flag.device.type == "cuda":
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event: Optional[Any] = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = flag, None

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def value(self) -> bool:
        if self.event is not None:
            self.event.synchronize()  # a no-op when ready() was True
        return bool(self.host)


class DivergenceGuard(pl.Callback):
    """Check the inputs before step 0; detect non-finite losses/unknowns, restore the last good state, raise
    after too many consecutive restores.

    Args:
        check_every_n_steps: how often to check finiteness (each check costs one host sync).
        snapshot_every_n_steps: how often to snapshot the unknowns when a check finds them finite.
        max_restores: consecutive restores (without a new finite snapshot in between) allowed; one more
            divergence raises :class:`DivergenceError`.
        check_inputs: run the start-of-run checks (zero observation, non-finite/zero victim output).
        check_mode: "blocking" reads each check at once (one host sync per check on a GPU); "deferred" reads it at
            a later check, once the device has produced it (never waits; a divergence is acted on one check later;
            off CUDA: at the next check); "auto" (default): deferred on CUDA, blocking elsewhere and under a
            multi-process strategy (whose ranks decide together).
    """

    def __init__(
        self, check_every_n_steps: int = 1, snapshot_every_n_steps: int = 10, max_restores: int = 3, check_inputs: bool = True,
        check_mode: Literal["auto", "blocking", "deferred"] = "auto",
    ) -> None:
        if check_every_n_steps < 1 or snapshot_every_n_steps < 1 or max_restores < 0:
            raise ValueError("check_every_n_steps and snapshot_every_n_steps must be >= 1, max_restores >= 0")
        if check_mode not in ("auto", "blocking", "deferred"):
            raise ValueError(f"check_mode must be 'auto', 'blocking' or 'deferred', got {check_mode!r}")
        self.check_mode = check_mode
        self._pending: deque[_PendingCheck] = deque()
        self.check_every_n_steps = check_every_n_steps
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.max_restores = max_restores
        self.check_inputs = check_inputs
        self.restores = 0  # over the whole run (for reports)
        self.consecutive_restores = 0
        self.events: list[dict[str, Any]] = []
        self._snapshot: Optional[list[torch.Tensor]] = None
        self._snapshot_step = 0
        self._last_restore_step = -1

    @staticmethod
    def _unknowns(pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ before step 0
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._unknowns(pl_module)
        if not _all_finite(params):
            raise DivergenceError(
                f"the attack's unknowns are not finite at step {trainer.global_step} (e.g. resumed from a checkpoint "
                "saved after a divergence); resume from an earlier checkpoint or start afresh"
            )
        self._snapshot = [p.detach().clone() for p in params]
        self._snapshot_step = trainer.global_step
        self.consecutive_restores = 0
        self._last_restore_step = -1
        self._pending.clear()
        if self.check_inputs:
            self.check_attack_inputs(pl_module, trainer)

    @staticmethod
    def check_attack_inputs(pl_module: pl.LightningModule, trainer: Optional[pl.Trainer] = None) -> None:
        """The start-of-run checks (see the module docstring); a no-op for modules that are not bound attacks."""
        needed = ("observation", "victim", "dummy_batch", "victim_gradients")
        if not all(hasattr(type(pl_module), name) for name in needed):
            return
        try:
            pl_module.observation
        except RuntimeError:  # not bound to a victim
            return
        sharded = trainer is not None and getattr(pl_module, "shard", None) is not None

        def agreed(ok: bool) -> bool:  # every rank takes the same decision (a lone raise would hang the others)
            return trainer.strategy.reduce_boolean_decision(ok, all=True) if sharded else ok

        with torch.inference_mode(False), torch.enable_grad():
            images, targets = pl_module.dummy_batch()
            with torch.no_grad():
                logits = forward_keeping_buffers(pl_module.victim, images.detach())
            if not agreed(_all_finite([logits])):
                raise VictimOutputError(
                    f"the victim ({type(pl_module.victim).__name__}) returns non-finite outputs on the attack's dummy "
                    "batch; its gradients are then NaN or zero and nothing can be reconstructed: fix the model's forward"
                )
            observed = [g for g in pl_module.observation.gradients]
            if _all_zero(observed):
                raise UninformativeObservationError(
                    "the observed gradient is all zero (e.g. TopKPruning(1.0), or a victim whose loss is flat): "
                    "it carries no information about the data, so nothing can be reconstructed"
                )
            dummy = pl_module.victim_gradients(images, targets)
            if not agreed(_all_finite(dummy) and not _all_zero(dummy)):
                raise VictimOutputError(
                    f"the victim's gradient on the dummy batch is {'non-finite' if not _all_finite(dummy) else 'all zero'}: "
                    "the matching distance cannot guide the unknowns (check the victim's forward and the attack's init)"
                )

    # ------------------------------------------------------------------ during the run
    def _deferred(self, pl_module: pl.LightningModule, device: torch.device) -> bool:
        if getattr(pl_module, "shard", None) is not None:  # lightning_gi.distributed: ranks decide together, at once
            return False
        return self.check_mode == "deferred" or (self.check_mode == "auto" and device.type == "cuda")

    def _snapshot_due(self, step: int) -> bool:
        """A new snapshot needs snapshot_every_n_steps finite steps since the last snapshot (or pending candidate)
        AND the last restore."""
        last = max([self._snapshot_step, self._last_restore_step] + [p.step for p in self._pending if p.candidate is not None])
        return self._snapshot is None or step - last >= self.snapshot_every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.check_every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        params = self._unknowns(pl_module)
        tensors = params + ([loss] if isinstance(loss, torch.Tensor) else [])
        if not tensors:
            return
        flag = _finite_flag(tensors)  # on the device: no host sync yet
        if not self._deferred(pl_module, flag.device):
            finite = bool(flag)
            if getattr(pl_module, "shard", None) is not None:
                finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
            candidate = [p.detach().clone() for p in params] if finite and self._snapshot_due(step) else None
            self._resolve(trainer, pl_module, step, finite, candidate, step)
            return
        candidate = [p.detach().clone() for p in params] if self._snapshot_due(step) else None  # device copies
        self._pending.append(_PendingCheck(step, flag, candidate))
        self._drain(trainer, pl_module, step, keep_newest=flag.device.type != "cuda")

    def _drain(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: int, keep_newest: bool = False, wait: bool = False) -> None:
        """Act on the pending checks whose flags have landed (all of them with ``wait``), oldest first; off CUDA the
        newest stays pending (read at the next check). More than 8 pending: wait for the oldest (bounded memory)."""
        while self._pending:
            head = self._pending[0]
            if not wait and len(self._pending) <= 8 and ((keep_newest and len(self._pending) == 1) or not head.ready()):
                return
            self._pending.popleft()
            finite = head.value()
            self._resolve(trainer, pl_module, head.step, finite, head.candidate, now)
            if not finite:
                self._pending.clear()  # later checks ran from the diverged state: their snapshots are void

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the checks still pending (before the attack scores its final iterate)."""
        if self._pending:
            self._drain(trainer, pl_module, trainer.global_step, wait=True)

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, finite: bool,
                 candidate: Optional[list[torch.Tensor]], now: int) -> None:
        """Act on the check of ``step`` (read at step ``now``): keep its snapshot candidate, or restore and count."""
        if finite:
            if candidate is not None:
                self._snapshot = candidate
                self._snapshot_step = step
                self.consecutive_restores = 0  # recovered: a new good state
            return
        params = self._unknowns(pl_module)
        event: dict[str, Any] = {"step": step, "restored_to": self._snapshot_step}
        if now != step:
            event["found_at_step"] = now
        self.events.append(event)
        if self._snapshot is not None:
            with torch.no_grad():
                for p, snap in zip(params, self._snapshot):
                    p.copy_(snap)
        if self.consecutive_restores >= self.max_restores:
            raise DivergenceError(
                f"non-finite loss or unknowns at step {step} after {self.consecutive_restores} consecutive restores "
                f"(to step {self._snapshot_step}); stopping. The best iterate so far (matching distance "
                f"{float(getattr(pl_module, 'best_loss', float('nan'))):.4g}) is written; try a smaller learning rate"
            )
        self.restores += 1
        self.consecutive_restores += 1
        self._last_restore_step = now
        rank_zero_warn(
            f"DivergenceGuard: non-finite loss or unknowns at step {step}; restored the unknowns of step "
            f"{self._snapshot_step} and reset the optimiser state (restore {self.consecutive_restores}/{self.max_restores})."
        )
        for opt in trainer.optimizers:
            opt.state.clear()
