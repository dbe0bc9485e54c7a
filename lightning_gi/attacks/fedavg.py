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

Label slots. A label rule applied to an aggregate update recovers the label *multiset* (the iDLG
negative-row rule returns it sorted by class), not which client held which label nor, with
``local_batch_size`` smaller than the client's batch, at which local step it was used. The simulated
update depends on both, so an arbitrary placement cannot reach zero distance even at the true images.
``label_assignment="search"`` (what ``"auto"``, the default, means for any label rule but
:class:`~lightning_gi.labels.SharedLabels`) chooses the label-to-slot assignment by the matching distance,
never by the ground truth: it lists the placements the update can tell apart (:func:`slot_classes`,
:func:`assignment_key`: clients of equal size and slots used by the same local steps are interchangeable)
and runs successive halving over them: every placement gets ``assignment_steps`` optimiser steps on its
own copy of the dummy images, the better half (lowest matching distance) survives and gets twice as many
more, until one is left; the attack then continues from the winner's labels and images. The true placement
is (generically) the only one whose distance can reach zero; with too few steps the ranking can still be wrong (the
searched placement and its distance are logged and kept in ``assignment_history``). Beyond
``max_assignments`` placements the search is greedy: rounds of successive halving over every
distinguishable pairwise swap of the current placement. A search round spends at most ``trainer.max_steps``
optimiser steps (fewer steps per placement when the run is short; none in a 2-step smoke run).

Concrete attacks: :class:`FedAvgDLG` (per-slot soft labels optimised jointly, so no slot search is
needed) and :class:`FedAvgIDLG`. Other attacks combine the same way::

    class FedAvgMyAttack(UnrolledUpdateMixin, MyAttack): ...

(the slot search needs the attack's unknowns to be one ``dummy_images`` parameter of shape [N, C, H, W];
restart-stacked attacks such as Inverting Gradients are not combined here).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Literal, Optional

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from ..labels import LabelStrategy, SharedLabels
from ..observation import GradientObservation
from ..victim.threat_models import UpdateSpec, local_step_indices, simulate_shared_update
from .base import _default_lbfgs
from .dlg import DLG, IDLG

LabelAssignment = Literal["auto", "search", "as_recovered"]
LABEL_ASSIGNMENTS = ("auto", "search", "as_recovered")
_EXHAUSTIVE_MAX_SLOTS = 8  # enumerate all N! permutations only up to this batch size


def slot_classes(spec: UpdateSpec, batch_size: int) -> list[list[list[int]]]:
    """The symmetry of the shared update in its slots: ``[client][class] -> slot indices``.

    Slots in one class are interchangeable (they enter exactly the same local steps of the same client).
    FedSGD/DP-SGD: each client is one class (its mean loss). FedAvg: slots that local step s uses
    (:func:`local_step_indices`) form the classes, so with ``local_batch_size`` below the client's batch
    size the order inside the client matters. Clients of equal size are interchangeable (sum and mean)."""
    classes: list[list[list[int]]] = []
    start = 0
    for size in spec.sizes(batch_size):
        if spec.threat_model == "fedavg":
            steps: dict[int, set[int]] = {i: set() for i in range(size)}
            for s in range(spec.local_steps):
                for i in local_step_indices(s, size, spec.local_batch_size).tolist():
                    steps[i].add(s)
            groups: dict[frozenset[int], list[int]] = {}
            for i in range(size):
                groups.setdefault(frozenset(steps[i]), []).append(start + i)
            classes.append(list(groups.values()))
        else:
            classes.append([list(range(start, start + size))])
        start += size
    return classes


def assignment_key(order: tuple[int, ...], classes: list[list[list[int]]], pooled: bool) -> tuple:
    """A canonical form of a slot layout ``order`` (slot -> item): two layouts with the same key give the
    same shared update. ``pooled``: FedSGD, where all clients of one size act as a single mean loss."""
    if pooled:  # fedsgd/dpsgd: only the client size weighs an example
        by_size: dict[int, list[int]] = {}
        for client in classes:
            slots = client[0]
            by_size.setdefault(len(slots), []).extend(order[i] for i in slots)
        return tuple(sorted((size, tuple(sorted(items))) for size, items in by_size.items()))
    clients = []
    for client in classes:
        size = sum(len(c) for c in client)
        clients.append((size, tuple(tuple(sorted(order[i] for i in c)) for c in client)))
    return tuple(sorted(clients))


def _halving_cost(candidates: int, steps: int) -> int:
    """Optimiser steps successive halving spends on ``candidates`` layouts starting at ``steps`` per layout."""
    total = 0
    while True:
        total += candidates * steps
        if candidates <= 2 or steps == 0:
            return total
        candidates, steps = (candidates + 1) // 2, steps * 2


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
        label_assignment: how recovered labels are placed in the client/local-step slots. "search":
            choose the assignment by the matching distance (module docs); "as_recovered": keep the label
            rule's order (correct only when it is the slot order, e.g. labels shared in client order);
            "auto" (default): "as_recovered" for :class:`~lightning_gi.labels.SharedLabels`, else "search".
        assignment_steps: optimiser steps every candidate assignment gets in the first round of successive
            halving (>= 1); each later round keeps the better half and doubles the steps.
        assignment_rounds: greedy search (more than ``max_assignments`` assignments): at most this many
            rounds of "try every distinguishable pairwise swap, keep the best" (>= 1).
        max_assignments: search all distinguishable assignments up to this many (>= 1), greedy swaps beyond.
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
        label_assignment: LabelAssignment = "auto",
        assignment_steps: int = 2,
        assignment_rounds: int = 4,
        max_assignments: int = 24,
    ) -> None:
        if label_assignment not in LABEL_ASSIGNMENTS:
            raise ValueError(f"label_assignment must be one of {LABEL_ASSIGNMENTS}, got {label_assignment!r}")
        for name, value in (("assignment_steps", assignment_steps), ("assignment_rounds", assignment_rounds),
                            ("max_assignments", max_assignments)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self._update_overrides = {
            "threat_model": threat_model,
            "local_steps": local_steps,
            "local_lr": local_lr,
            "local_batch_size": local_batch_size,
            "client_batch_sizes": client_batch_sizes,
            "aggregation": aggregation,
        }
        self.normalize_update = normalize_update
        self.label_assignment = label_assignment
        self.assignment_steps = assignment_steps
        self.assignment_rounds = assignment_rounds
        self.max_assignments = max_assignments
        self.assignment_history: list[dict[str, Any]] = []
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
        if self._resolved_assignment() == "search" and getattr(self, "labels", None) is not None:
            self.search_label_assignment()
        return out

    def victim_gradients(self, images: Tensor, targets: Tensor) -> list[Tensor]:
        """The simulated shared update of the dummy batch, differentiable in the dummies."""
        spec = self.update_spec()
        update = simulate_shared_update(
            self.victim, images, targets, spec, params=self._victim_params, create_graph=True  # type: ignore[attr-defined]
        )
        scale = self._scale(spec)
        return [u * scale for u in update] if scale != 1.0 else update

    # the label-to-slot assignment -----------------------------------------------------------------
    def _resolved_assignment(self) -> str:
        if self.label_assignment != "auto":
            return self.label_assignment
        return "as_recovered" if isinstance(self.label_strategy, SharedLabels) else "search"  # type: ignore[attr-defined]

    def update_distance(self, images: Tensor, labels: Tensor) -> float:
        """The matching distance of the simulated update of (images, labels), without a graph (for scoring)."""
        spec = self.update_spec()
        with torch.enable_grad():
            update = simulate_shared_update(
                self.victim, images.detach(), labels, spec, params=self._victim_params, create_graph=False  # type: ignore[attr-defined]
            )
        scale = self._scale(spec)
        update = [u.detach() * scale for u in update]
        value = float(self.matching_distance(update))  # type: ignore[attr-defined]
        return value if math.isfinite(value) else math.inf

    def _distinct_layouts(self, labels: list[int], classes: list[list[list[int]]], pooled: bool) -> Optional[list[tuple[int, ...]]]:
        """One slot permutation per label layout the update can tell apart (the recovered order first), or None
        when there are more than ``max_assignments`` of them (or the batch is too large to enumerate)."""
        n = len(labels)
        if n > _EXHAUSTIVE_MAX_SLOTS:
            return None
        seen: dict[tuple, tuple[int, ...]] = {}
        for order in itertools.permutations(range(n)):  # the identity comes first
            key = assignment_key(tuple(labels[i] for i in order), classes, pooled)
            if key not in seen:
                seen[key] = order
                if len(seen) > self.max_assignments:
                    return None
        return list(seen.values())

    def _single_swaps(self, labels: list[int], classes: list[list[list[int]]], pooled: bool) -> list[tuple[int, ...]]:
        """The identity and every pairwise swap of slots that changes the label layout (greedy neighbourhood)."""
        n = len(labels)
        identity = tuple(range(n))
        seen = {assignment_key(tuple(labels), classes, pooled): identity}
        for i in range(n):
            for j in range(i + 1, n):
                order = list(identity)
                order[i], order[j] = j, i
                seen.setdefault(assignment_key(tuple(labels[k] for k in order), classes, pooled), tuple(order))
        return list(seen.values())

    def _successive_halving(self, start: Tensor, labels: Tensor, orders: list[tuple[int, ...]]) -> tuple[tuple[int, ...], Tensor, float]:
        """Score label layouts by the matching distance after optimising their images (from ``start``, the
        images following their labels): every layout gets ``assignment_steps`` optimiser steps, the better
        half survives and gets twice as many more, until one is left. Returns (order, its images, distance)."""
        alive = []
        for order in orders:
            image = torch.nn.Parameter(start[list(order)].detach().clone())
            alive.append({"order": order, "labels": labels[list(order)], "images": image,
                          "optimizer": self.optimizer_factory([image]), "distance": math.inf})  # type: ignore[attr-defined]
        steps = self._first_rung_steps(len(orders))
        while True:
            for cand in alive:
                self._optimise(cand["images"], cand["labels"], cand["optimizer"], steps)
                cand["distance"] = self.update_distance(cand["images"], cand["labels"])
            alive.sort(key=lambda c: c["distance"])
            if len(alive) == 1 or steps == 0:
                break
            alive = alive[: (len(alive) + 1) // 2]
            if len(alive) == 1:  # the winner's further optimisation is the attack's own run
                break
            steps *= 2
        best = alive[0]
        return best["order"], best["images"].detach(), best["distance"]

    def _first_rung_steps(self, candidates: int) -> int:
        """``assignment_steps``, lowered so that the search spends at most ``trainer.max_steps`` optimiser steps
        (0: the layouts are only scored at the start images, e.g. in a 2-step smoke run)."""
        trainer = getattr(self, "_trainer", None)
        budget = int(getattr(trainer, "max_steps", -1) or -1) if trainer is not None else -1
        steps = self.assignment_steps
        while steps > 0 and budget > 0 and _halving_cost(candidates, steps) > budget:
            steps -= 1
        return steps

    def _optimise(self, images: torch.nn.Parameter, labels: Tensor, optimizer: torch.optim.Optimizer, steps: int) -> None:
        """``steps`` steps of the attack's optimiser on ``images`` for fixed labels (non-finite steps undone)."""
        before = images.detach().clone()

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss, _, _, _ = self.batch_objective(images, labels)  # type: ignore[attr-defined]
            loss.backward(inputs=[images])
            return loss

        with torch.enable_grad():
            for _ in range(steps):
                optimizer.step(closure)
        if not torch.isfinite(images).all():
            with torch.no_grad():
                images.copy_(before)

    def search_label_assignment(self) -> list[int]:
        """Choose the label-to-slot assignment by the matching distance (module docs). Permutes ``labels`` in
        place, warm-starts ``dummy_images`` with the winner's images, and returns the permutation applied."""
        images = getattr(self, "dummy_images", None)
        labels: Tensor = self.labels  # type: ignore[attr-defined]
        n = labels.numel()
        if not isinstance(images, torch.nn.Parameter) or images.ndim != 4 or images.shape[0] != n:
            raise ValueError(
                "label_assignment='search' needs the attack's unknowns to be one dummy_images parameter [N, C, H, W]"
            )
        if getattr(self, "batch_sharded", False):
            raise ValueError("label_assignment='search' does not support a batch-sharded attack (gi_shard)")
        spec = self.update_spec()
        classes = slot_classes(spec, n)
        pooled = spec.threat_model != "fedavg"
        total = list(range(n))
        if len(self._single_swaps(labels.tolist(), classes, pooled)) == 1:
            return total  # every placement of these labels gives the same update: nothing to choose
        layouts = self._distinct_layouts(labels.tolist(), classes, pooled)
        rounds = 1 if layouts is not None else self.assignment_rounds
        for round_index in range(rounds):
            current = self.labels.tolist()  # type: ignore[attr-defined]
            orders = layouts if layouts is not None else self._single_swaps(current, classes, pooled)
            order, best_images, distance = self._successive_halving(
                self.dummy_images.detach(), self.labels, orders  # type: ignore[attr-defined]
            )
            method = "exhaustive" if layouts is not None else "greedy swaps"
            self.assignment_history.append(
                {"round": round_index, "method": method, "candidates": len(orders), "distance": distance,
                 "labels": [current[i] for i in order]}
            )
            with torch.no_grad():
                self.dummy_images.copy_(best_images)  # type: ignore[attr-defined]
            self.labels = self.labels[list(order)]  # type: ignore[attr-defined]
            total = [total[i] for i in order]
            if tuple(order) == tuple(range(n)):
                break
        rounds_info = "; ".join(
            f"{h['method']} over {h['candidates']}: {h['distance']:.4g}" for h in self.assignment_history
        )
        rank_zero_info(
            f"{type(self).__name__}: label-to-slot assignment {self.labels.tolist()} chosen by the matching "  # type: ignore[attr-defined]
            f"distance ({rounds_info})"
        )
        return total


class FedAvgIDLG(UnrolledUpdateMixin, IDLG):
    """iDLG against a FedAvg update (or an aggregate of clients): label rule on the pseudo-gradient, the
    label-to-slot assignment chosen by the matching distance, then the images alone, matching the unrolled
    local training. Arguments: :class:`IDLG` + those of :class:`UnrolledUpdateMixin`."""

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
        label_assignment: LabelAssignment = "auto",
        assignment_steps: int = 2,
        assignment_rounds: int = 4,
        max_assignments: int = 24,
    ) -> None:
        IDLG.__init__(self, optimizer, lr_scheduler, label_strategy, init, seed)
        self._init_update(
            threat_model, local_steps, local_lr, local_batch_size, client_batch_sizes, aggregation, normalize_update,
            label_assignment, assignment_steps, assignment_rounds, max_assignments,
        )


class FedAvgDLG(UnrolledUpdateMixin, DLG):
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
        normalize_update: bool = True,
    ) -> None:
        DLG.__init__(self, optimizer, lr_scheduler, init, seed)
        self._init_update(threat_model, local_steps, local_lr, local_batch_size, client_batch_sizes, aggregation, normalize_update)


__all__ = ["FedAvgDLG", "FedAvgIDLG", "LABEL_ASSIGNMENTS", "UnrolledUpdateMixin", "assignment_key", "slot_classes"]
