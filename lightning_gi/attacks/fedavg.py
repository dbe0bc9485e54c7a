"""iDLG and DLG against a FedAvg update with the threat model given as arguments (configs written for them).

Since the one client simulation (:mod:`lightning_gi.client`), FedAvg is a property of the *observation*:
every attack reads :class:`~lightning_gi.client.ThreatModel` from the observation's metadata and matches the
simulated shared update (the local steps unrolled differentiably, several clients summed or averaged), with
both the observed and the simulated FedAvg update divided by ``-local_lr`` (one local step then IS the FedSGD
gradient). Recovered labels are placed into the update's client / local-step slots by the matching distance
(:class:`~lightning_gi.attacks.label_slots.LabelSlotSearch`), in every attack with fixed labels.

The two classes here add what an observation captured elsewhere may lack: the threat model's
hyperparameters as arguments (None: read them from the metadata; they fill
:attr:`~lightning_gi.attacks.base.GradientInversionAttack.threat_model_overrides`) and the search's settings. Any other attack
attacks a FedAvg observation as it is (``lightning_gi.attacks.IDLG``, ``InvertingGradients``, ...).
"""
from __future__ import annotations

from typing import Any, Optional

from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable

from ..labels import LabelStrategy
from .base import _default_lbfgs
from .dlg import DLG, IDLG
from .label_slots import LABEL_ASSIGNMENTS, LabelAssignment, LabelSlotSearch, assignment_key, slot_classes


class FedAvgIDLG(IDLG):
    """iDLG against a FedAvg update (or an aggregate of clients): label rule on the pseudo-gradient, the
    label-to-slot assignment chosen by the matching distance, then the images alone, matching the unrolled
    local training. Arguments: :class:`IDLG`'s, the threat model's hyperparameters (None: from the observation's
    metadata) and :class:`~lightning_gi.attacks.label_slots.LabelSlotSearch`'s (``label_assignment`` is its mode)."""

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_lbfgs,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        label_strategy: Optional[LabelStrategy] = None,
        init: str = "randn",
        seed: int = 0,
        threat_model: Optional[str] = None,
        local_steps: Optional[int] = None,
        local_lr: Optional[float] = None,
        local_batch_size: Optional[int] = None,
        client_batch_sizes: Optional[list[int]] = None,
        aggregation: Optional[str] = None,
        label_assignment: LabelAssignment = "auto",
        assignment_steps: int = 2,
        assignment_rounds: int = 4,
        max_assignments: int = 24,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, label_strategy, init, seed)
        self.threat_model_overrides = dict(
            threat_model=threat_model, local_steps=local_steps, local_lr=local_lr, local_batch_size=local_batch_size,
            client_batch_sizes=client_batch_sizes, aggregation=aggregation,
        )
        self.label_slots = LabelSlotSearch(label_assignment, assignment_steps, assignment_rounds, max_assignments)

    @property
    def assignment_history(self) -> list[dict[str, Any]]:
        """What the label-to-slot search tried (one entry per round)."""
        return self.label_slots.history


class FedAvgDLG(DLG):
    """DLG against a FedAvg update: images and per-slot label logits jointly, matching the unrolled local
    training (each slot's soft label is its own unknown, so no label-to-slot search is needed)."""

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_lbfgs,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        init: str = "randn",
        seed: int = 0,
        threat_model: Optional[str] = None,
        local_steps: Optional[int] = None,
        local_lr: Optional[float] = None,
        local_batch_size: Optional[int] = None,
        client_batch_sizes: Optional[list[int]] = None,
        aggregation: Optional[str] = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, init, seed)
        self.threat_model_overrides = dict(
            threat_model=threat_model, local_steps=local_steps, local_lr=local_lr, local_batch_size=local_batch_size,
            client_batch_sizes=client_batch_sizes, aggregation=aggregation,
        )


__all__ = ["FedAvgDLG", "FedAvgIDLG", "LABEL_ASSIGNMENTS", "LabelAssignment", "assignment_key", "slot_classes"]
