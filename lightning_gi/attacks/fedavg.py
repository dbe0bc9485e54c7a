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

from ..client import ThreatModel
from .dlg import DLG, IDLG
from .label_slots import LABEL_ASSIGNMENTS, LabelAssignment, LabelSlotSearch, assignment_key, slot_classes


class FedAvgIDLG(IDLG):
    """iDLG against a FedAvg update (or an aggregate of clients) whose observation may lack the threat model.

    Args:
        threat_model: how the update was produced (``lightning_gi.client.ThreatModel``: ``threat_model``,
            ``local_steps``, ``local_lr``, ``local_batch_size`` (null: the whole client batch each step),
            ``client_batch_sizes``, ``aggregation``); None: read from the observation's metadata.
        label_assignment, assignment_steps, assignment_rounds, max_assignments: the label-to-slot search
            (:class:`~lightning_gi.attacks.label_slots.LabelSlotSearch`: its mode, steps, rounds, max_assignments).
        Other arguments: :class:`IDLG`'s.
    """

    def __init__(
        self,
        threat_model: Optional[ThreatModel] = None,
        label_assignment: LabelAssignment = "auto",
        assignment_steps: int = 2,
        assignment_rounds: int = 4,
        max_assignments: int = 24,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.threat_model_given = threat_model
        self.label_slots = LabelSlotSearch(label_assignment, assignment_steps, assignment_rounds, max_assignments)

    @property
    def assignment_history(self) -> list[dict[str, Any]]:
        """What the label-to-slot search tried (one entry per round)."""
        return self.label_slots.history


class FedAvgDLG(DLG):
    """DLG against a FedAvg update whose observation may lack the threat model: images and per-slot label logits
    jointly (each slot's soft label is its own unknown, so no label-to-slot search is needed).

    Args:
        threat_model: as :class:`FedAvgIDLG`'s. Other arguments: :class:`DLG`'s.
    """

    def __init__(self, threat_model: Optional[ThreatModel] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threat_model_given = threat_model


__all__ = ["FedAvgDLG", "FedAvgIDLG", "LABEL_ASSIGNMENTS", "LabelAssignment", "assignment_key", "slot_classes"]
