"""Attacks on shared *updates*: FedAvg weight differences and aggregates of several clients.

:class:`UnrolledUpdateMixin` replaces the base class's ``victim_gradients`` (one FedSGD gradient of the
dummy batch) by the simulated shared update of the dummy batch: the dummy batch is split over the
clients, each client's local SGD steps are unrolled differentiably with ``torch.func.functional_call``
(:func:`~lightning_gi.victim.threat_models.unrolled_update`, ``create_graph=True``), and the clients'
updates are summed or averaged exactly as the server saw them. The hyperparameters come from the
observation's ``metadata`` (written by :class:`~lightning_gi.victim.threat_models.ThreatModelVictim`)
unless given explicitly (observations captured elsewhere).

With ``normalize_update`` (default) both the simulated and the observed FedAvg update are divided by
``-local_lr``: a single local step then *is* the FedSGD gradient, so distances, label rules and
optimiser tolerances keep the scale they have for FedSGD.

Concrete attacks: :class:`FedAvgDLG`, :class:`FedAvgIDLG` (and :class:`FedAvgInvertingGradients`
when the Inverting Gradients attack is available). Any attack can be combined the same way::

    class FedAvgMyAttack(UnrolledUpdateMixin, MyAttack): ...
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from ..labels import LabelStrategy
from ..observation import GradientObservation
from ..victim.threat_models import UpdateSpec, simulate_shared_update
from .base import _default_lbfgs
from .dlg import DLG, IDLG


class UnrolledUpdateMixin:
    """Match the simulated shared update instead of one gradient (put it first in the bases).

    Explicit arguments override the observation's metadata; None means "read it from the metadata"
    (absent metadata means one FedSGD client, i.e. the base attack unchanged).

    Args:
        threat_model: "fedsgd", "fedavg" or "dpsgd" (dpsgd is matched as a FedSGD gradient).
        local_steps, local_lr, local_batch_size: FedAvg's local training (0 batch size: all data each step).
        client_batch_sizes: how the observed batch is split over clients, e.g. [4, 4].
        aggregation: "mean" or "sum" over clients.
        normalize_update: divide FedAvg updates (observed and simulated) by -local_lr.
    """

    def _init_update(
        self,
        threat_model: Optional[str] = None,
        local_steps: Optional[int] = None,
        local_lr: Optional[float] = None,
        local_batch_size: Optional[int] = None,
        client_batch_sizes: Optional[list[int]] = None,
        aggregation: Optional[str] = None,
        normalize_update: bool = True,
    ) -> None:
        self._update_overrides = {
            "threat_model": threat_model,
            "local_steps": local_steps,
            "local_lr": local_lr,
            "local_batch_size": local_batch_size,
            "client_batch_sizes": client_batch_sizes,
            "aggregation": aggregation,
        }
        self.normalize_update = normalize_update
        self._spec: Optional[UpdateSpec] = None

    # the spec -----------------------------------------------------------------------------------
    def update_spec(self, observation: Optional[GradientObservation] = None) -> UpdateSpec:
        if self._spec is not None and observation is None:
            return self._spec
        obs = observation if observation is not None else self.observation  # type: ignore[attr-defined]
        meta: dict[str, Any] = dict(obs.metadata)
        for key, value in self._update_overrides.items():
            if value is None:
                continue
            meta[key] = ",".join(str(int(v)) for v in value) if key == "client_batch_sizes" else value
        return UpdateSpec.from_metadata(meta, obs.batch_size)

    def _scale(self, spec: UpdateSpec) -> float:
        return -1.0 / spec.local_lr if (self.normalize_update and spec.threat_model == "fedavg") else 1.0

    # hooks into the base attack ----------------------------------------------------------------
    def recover_labels(self) -> Optional[Tensor]:
        """Label rules see the pseudo-gradient (the update divided by -local_lr for FedAvg)."""
        strategy: Optional[LabelStrategy] = self.label_strategy  # type: ignore[attr-defined]
        if strategy is None:
            return None
        obs: GradientObservation = self.observation  # type: ignore[attr-defined]
        scale = self._scale(self.update_spec(obs))
        if scale != 1.0:
            obs = GradientObservation(
                gradients=[g * scale for g in obs.gradients],
                batch_size=obs.batch_size,
                labels=obs.labels,
                param_names=obs.param_names,
                loss_reduction=obs.loss_reduction,
                metadata=dict(obs.metadata),
            )
        return strategy(obs, self.victim)  # type: ignore[attr-defined]

    def bind(self, inputs: Any, device: Optional[torch.device] = None) -> Any:
        spec = self.update_spec(inputs.observation)
        if sum(spec.sizes(inputs.observation.batch_size)) != inputs.observation.batch_size:
            raise ValueError(
                f"client_batch_sizes {spec.client_batch_sizes} do not sum to the observation's batch_size "
                f"{inputs.observation.batch_size}"
            )
        out = super().bind(inputs, device)  # type: ignore[misc]
        self._spec = spec
        scale = self._scale(spec)
        if scale != 1.0:
            self._target_gradients = [g * scale for g in self._target_gradients]  # type: ignore[attr-defined]
        return out

    def victim_gradients(self, images: Tensor, targets: Tensor) -> list[Tensor]:
        """The simulated shared update of the dummy batch, differentiable in the dummies."""
        spec = self.update_spec()
        update = simulate_shared_update(
            self.victim, images, targets, spec, params=self._victim_params, create_graph=True  # type: ignore[attr-defined]
        )
        scale = self._scale(spec)
        return [u * scale for u in update] if scale != 1.0 else update


class FedAvgIDLG(UnrolledUpdateMixin, IDLG):
    """iDLG against a FedAvg update (or an aggregate of clients): label rule on the pseudo-gradient, then
    the images alone, matching the unrolled local training. Arguments: :class:`IDLG` + the update spec
    of :class:`UnrolledUpdateMixin`."""

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
        normalize_update: bool = True,
    ) -> None:
        IDLG.__init__(self, optimizer, lr_scheduler, label_strategy, init, seed)
        self._init_update(threat_model, local_steps, local_lr, local_batch_size, client_batch_sizes, aggregation, normalize_update)


class FedAvgDLG(UnrolledUpdateMixin, DLG):
    """DLG against a FedAvg update: images and label logits jointly, matching the unrolled local training."""

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
        normalize_update: bool = True,
    ) -> None:
        DLG.__init__(self, optimizer, lr_scheduler, init, seed)
        self._init_update(threat_model, local_steps, local_lr, local_batch_size, client_batch_sizes, aggregation, normalize_update)


__all__ = ["FedAvgDLG", "FedAvgIDLG", "UnrolledUpdateMixin"]
