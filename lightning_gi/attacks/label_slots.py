"""Which recovered label sits in which client / local-step slot: chosen by the matching distance.

A label rule applied to an aggregate update recovers the label *multiset* (the iDLG negative-row rule
returns it sorted by class), not which client held which label nor, with FedAvg's ``local_batch_size``
smaller than the client's batch, at which local step it was used. The simulated update
(:meth:`lightning_gi.client.ThreatModel.simulate`) depends on both, so an arbitrary placement cannot reach
zero distance even at the true images. The attacker never assumes an order it cannot know:
:class:`LabelSlotSearch` lists the placements the update can tell apart (:func:`slot_classes`,
:func:`assignment_key`: clients of equal size and slots used by the same local steps are interchangeable)
and runs successive halving over them, scoring each by the attack's own matching distance after optimising
images for it (never by the ground truth). Beyond ``max_assignments`` placements the search is greedy
(rounds of every distinguishable pairwise swap). One FedSGD gradient has a single slot class: nothing to
search. The search uses only the attack's public methods (:meth:`initial_images`, :meth:`batch_objective`,
:meth:`update_distance`, :meth:`assign_labels`), so it serves every attack with fixed labels.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Literal, Optional

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from ..client import ThreatModel, local_step_indices

LabelAssignment = Literal["auto", "search", "as_recovered"]
LABEL_ASSIGNMENTS = ("auto", "search", "as_recovered")
_EXHAUSTIVE_MAX_SLOTS = 8  # enumerate all N! permutations only up to this batch size


def slot_classes(spec: ThreatModel, batch_size: int) -> list[list[list[int]]]:
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


def halving_cost(candidates: int, steps: int) -> int:
    """Optimiser steps successive halving spends on ``candidates`` layouts starting at ``steps`` per layout."""
    total = 0
    while True:
        total += candidates * steps
        if candidates <= 2 or steps == 0:
            return total
        candidates, steps = (candidates + 1) // 2, steps * 2


class LabelSlotSearch:
    """How an attack places recovered labels into the update's slots (module docs).

    Args:
        mode: "search": choose the placement by the matching distance; "as_recovered": keep the label rule's
            order (correct only when it IS the slot order, e.g. labels shared in client order); "auto"
            (default): "as_recovered" for :class:`~lightning_gi.labels.SharedLabels`, else "search".
        steps: optimiser steps every candidate placement gets in the first round of successive halving (>= 1);
            each later round keeps the better half and doubles the steps.
        rounds: greedy search (more than ``max_assignments`` placements): at most this many rounds of "try every
            distinguishable pairwise swap, keep the best" (>= 1).
        max_assignments: search all distinguishable placements up to this many (>= 1), greedy swaps beyond.
    """

    def __init__(self, mode: LabelAssignment = "auto", steps: int = 2, rounds: int = 4, max_assignments: int = 24) -> None:
        if mode not in LABEL_ASSIGNMENTS:
            raise ValueError(f"label_assignment must be one of {LABEL_ASSIGNMENTS}, got {mode!r}")
        for name, value in (("assignment_steps", steps), ("assignment_rounds", rounds), ("max_assignments", max_assignments)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.mode, self.steps, self.rounds, self.max_assignments = mode, steps, rounds, max_assignments
        self.history: list[dict[str, Any]] = []

    def resolved_mode(self, label_strategy: Any) -> str:
        from ..labels import SharedLabels

        if self.mode != "auto":
            return self.mode
        return "as_recovered" if isinstance(label_strategy, SharedLabels) else "search"

    # ---------------------------------------------------------------------------------- enumeration
    def distinct_layouts(self, labels: list[int], classes: list[list[list[int]]], pooled: bool) -> Optional[list[tuple[int, ...]]]:
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

    @staticmethod
    def single_swaps(labels: list[int], classes: list[list[list[int]]], pooled: bool) -> list[tuple[int, ...]]:
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

    # ---------------------------------------------------------------------------------- scoring
    def first_rung_steps(self, attack: Any, candidates: int) -> int:
        """``steps``, lowered so that the search spends at most ``trainer.max_steps`` optimiser steps
        (0: the layouts are only scored at the start images, e.g. in a 2-step smoke run)."""
        trainer = getattr(attack, "_trainer", None)
        budget = int(getattr(trainer, "max_steps", -1) or -1) if trainer is not None else -1
        steps = self.steps
        while steps > 0 and budget > 0 and halving_cost(candidates, steps) > budget:
            steps -= 1
        return steps

    @staticmethod
    def optimise(attack: Any, images: torch.nn.Parameter, labels: Tensor, optimizer: torch.optim.Optimizer, steps: int) -> None:
        """``steps`` steps of the attack's optimiser on ``images`` for fixed labels (non-finite steps undone)."""
        before = images.detach().clone()

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss, _, _, _ = attack.batch_objective(images, labels)
            loss.backward(inputs=[images])
            return loss

        with torch.enable_grad():
            for _ in range(steps):
                optimizer.step(closure)
        if not torch.isfinite(images).all():
            with torch.no_grad():
                images.copy_(before)

    def successive_halving(self, attack: Any, start: Tensor, labels: Tensor, orders: list[tuple[int, ...]]) -> tuple[tuple[int, ...], Tensor, float]:
        """Every layout gets ``steps`` optimiser steps on its own copy of ``start`` (the images following their
        labels), the better half survives and gets twice as many more, until one is left.
        Returns (order, its images, distance)."""
        alive = []
        for order in orders:
            image = torch.nn.Parameter(start[list(order)].detach().clone())
            alive.append({"order": order, "labels": labels[list(order)], "images": image,
                          "optimizer": attack.optimizer_factory([image]), "distance": math.inf})
        steps = self.first_rung_steps(attack, len(orders))
        while True:
            for cand in alive:
                self.optimise(attack, cand["images"], cand["labels"], cand["optimizer"], steps)
                cand["distance"] = attack.update_distance(cand["images"], cand["labels"])
            alive.sort(key=lambda c: c["distance"])
            if len(alive) == 1 or steps == 0:
                break
            alive = alive[: (len(alive) + 1) // 2]
            if len(alive) == 1:  # the winner's further optimisation is the attack's own run
                break
            steps *= 2
        best = alive[0]
        return best["order"], best["images"].detach(), best["distance"]

    # ---------------------------------------------------------------------------------- the search
    def applies(self, attack: Any) -> bool:
        """Whether ``attack`` needs a search: fixed labels, a threat model with more than one slot layout, and
        a mode that resolves to "search"."""
        labels = getattr(attack, "labels", None)
        if labels is None or labels.dtype != torch.long or self.resolved_mode(attack.label_strategy) != "search":
            return False
        tm: ThreatModel = attack.threat_model
        if tm.is_single_gradient:
            return False
        classes = slot_classes(tm, labels.numel())
        return len(self.single_swaps(labels.tolist(), classes, tm.threat_model != "fedavg")) > 1

    def search(self, attack: Any, generator: torch.Generator) -> list[int]:
        """Choose the label-to-slot placement for ``attack`` and apply it (:meth:`assign_labels`, which also
        warm-starts the attack's images with the winner's when their shapes agree). Returns the permutation."""
        if getattr(attack, "batch_sharded", False):
            raise ValueError("the label-to-slot search does not support a batch-sharded attack (gi_shard)")
        tm: ThreatModel = attack.threat_model
        labels: Tensor = attack.labels
        n = labels.numel()
        classes = slot_classes(tm, n)
        pooled = tm.threat_model != "fedavg"
        layouts = self.distinct_layouts(labels.tolist(), classes, pooled)
        rounds = 1 if layouts is not None else self.rounds
        start = attack.initial_images(generator).to(labels.device)
        total = list(range(n))
        for round_index in range(rounds):
            current = attack.labels.tolist()
            orders = layouts if layouts is not None else self.single_swaps(current, classes, pooled)
            order, best_images, distance = self.successive_halving(attack, start, attack.labels, orders)
            self.history.append({"round": round_index, "method": "exhaustive" if layouts is not None else "greedy swaps",
                                 "candidates": len(orders), "distance": distance, "labels": [current[i] for i in order]})
            attack.assign_labels(list(order), best_images)
            start = best_images
            total = [total[i] for i in order]
            if tuple(order) == tuple(range(n)):
                break
        info = "; ".join(f"{h['method']} over {h['candidates']}: {h['distance']:.4g}" for h in self.history)
        rank_zero_info(f"{type(attack).__name__}: label-to-slot assignment {attack.labels.tolist()} chosen by the "
                       f"matching distance ({info})")
        return total


__all__ = ["LABEL_ASSIGNMENTS", "LabelAssignment", "LabelSlotSearch", "assignment_key", "halving_cost", "slot_classes"]
