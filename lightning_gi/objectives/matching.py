"""The matching objective of an attack as one public object: what is matched, how, and with which priors.

:class:`MatchingObjective` holds

* the target gradients (the observation, scaled to a gradient like quantity by the threat model),
* the gradient distance ``f(dummy, target, weights, masks) -> scalar``,
* the schedule state: per-tensor ``weights`` (None: every tensor, weight 1) and ``masks`` (None: unmasked),
* the image priors (the attack's ``priors`` list; each a module with a float ``weight``),
* the prepared form of the distance (the target-only parts computed once per change of targets, weights
  or masks, :func:`~lightning_gi.objectives.distances.prepare_distance`).

Schedules and guards change it only through :meth:`set_weights`, :meth:`set_masks`,
:meth:`set_prior_weight` and :meth:`reset_best` (which tells the attack that owns the objective to restart
its best-iterate tracking). Two distances are read from it: :meth:`optimised` (with the schedule's weights
and masks: what the optimiser sees) and :meth:`score` (every tensor, no weights, no masks, detached: what
ranks iterates and is reported), so scores from steps with different schedules compare like with like.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .distances import prepare_distance, squared_l2

__all__ = ["MatchingObjective"]

Weights = Optional[Sequence[float]]
Masks = Optional[Sequence[Optional[Tensor]]]


class MatchingObjective:
    """Targets, distance, schedule weights and masks, priors and the prepared-distance cache of one attack.

    Args:
        distance: gradient distance ``f(dummy, target, weights=None, masks=None) -> scalar`` (default squared L2).
        priors: the image priors (the attack registers them as its submodules; this object refers to the list).
    """

    def __init__(self, distance: Optional[Callable[..., Any]] = None, priors: Optional[nn.ModuleList] = None) -> None:
        self.distance = distance if distance is not None else squared_l2
        self.priors = priors if priors is not None else nn.ModuleList()
        self.targets: list[Tensor] = []
        self.weights: Optional[list[float]] = None
        self.masks: Optional[list[Optional[Tensor]]] = None
        self._prepared: Optional[tuple[tuple[Any, ...], Any]] = None
        self._weight_tensor: Optional[tuple[Any, Tensor]] = None
        self._best_listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ targets
    def set_targets(self, targets: Sequence[Tensor]) -> None:
        """The observed (gradient-scale) tensors to match, ``model.parameters()`` order."""
        self.targets = list(targets)
        self.weights, self.masks = None, None

    @property
    def num_tensors(self) -> int:
        return len(self.targets)

    # ------------------------------------------------------------------ schedule state
    def set_weights(self, weights: Weights) -> None:
        """One non-negative weight per target tensor (0: not matched), or None for every tensor at weight 1."""
        if weights is None:
            self.weights = None
            return
        values = [float(w) for w in weights]
        if len(values) != self.num_tensors or any(not w >= 0 for w in values):
            raise ValueError(f"weights must be {self.num_tensors} non-negative numbers, got {list(weights)!r}")
        self.weights = values

    def set_masks(self, masks: Masks) -> None:
        """One keep-mask (or None) per target tensor, applied to both gradients by the distance; None: unmasked."""
        if masks is None:
            self.masks = None
            return
        masks = list(masks)
        if len(masks) != self.num_tensors:
            raise ValueError(f"masks must be a list of {self.num_tensors} tensors or None, got {len(masks)}")
        for i, (m, t) in enumerate(zip(masks, self.targets)):
            if m is not None and m.shape != t.shape:
                raise ValueError(f"mask {i} has shape {tuple(m.shape)}, its gradient tensor {tuple(t.shape)}")
        self.masks = masks

    @property
    def scheduled(self) -> bool:
        """True when weights or masks currently shape the optimised distance."""
        return self.weights is not None or self.masks is not None

    @contextmanager
    def unscheduled(self) -> Iterator[None]:
        """Within the block the optimised distance ignores weights and masks (restored afterwards)."""
        saved = (self.weights, self.masks)
        self.weights, self.masks = None, None
        try:
            yield
        finally:
            self.weights, self.masks = saved

    def weight_tensor(self) -> Tensor:
        """The weights as one tensor on the targets' device (ones when unweighted); rebuilt only on change."""
        cached = self._weight_tensor
        if cached is not None and cached[0] is self.weights:
            return cached[1]
        ref = self.targets[0]
        dtype = torch.promote_types(ref.dtype, torch.float32)
        values = [1.0] * self.num_tensors if self.weights is None else self.weights
        w = torch.tensor(values, dtype=dtype, device=ref.device)
        self._weight_tensor = (self.weights, w)
        return w

    # ------------------------------------------------------------------ priors
    def prior_index(self, ref: Union[int, str]) -> int:
        """The index of a prior given by index or by class name (exactly one of that class)."""
        names = [type(p).__name__ for p in self.priors]
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            i = int(ref)
            if not 0 <= i < len(names):
                raise ValueError(f"prior index {i} out of range: the attack has {len(names)} priors")
            return i
        hits = [i for i, n in enumerate(names) if n == ref]
        if not hits:
            raise ValueError(f"no prior of class {ref!r} in the attack's priors {names}")
        if len(hits) > 1:
            raise ValueError(f"{len(hits)} priors of class {ref!r}: refer to them by index")
        return hits[0]

    def prior_weight(self, index: int) -> float:
        return float(getattr(self.priors[index], "weight", 1.0))

    def set_prior_weight(self, index: int, weight: float) -> None:
        """Set prior ``index``'s weight (0 switches it off; the attack then skips it at no cost)."""
        if not float(weight) >= 0:
            raise ValueError(f"a prior weight must be >= 0, got {weight}")
        self.priors[index].weight = float(weight)

    # ------------------------------------------------------------------ distances
    def optimised(self, dummy: Sequence[Tensor]) -> Tensor:
        """The distance the optimiser minimises: with the current weights and masks (prepared form when available)."""
        fn = self._prepared_distance()
        if fn is not None:
            return fn(dummy)
        return self.distance(dummy, self.targets, self.weights, self.masks)

    def optimised_with(self, dummy: Sequence[Tensor], weights: Tensor, masks: Masks) -> Tensor:
        """The optimised distance with weights given as one tensor (the compiled step: no recompiles on change)."""
        return self.distance(dummy, self.targets, list(weights.unbind(0)), masks)

    def score(self, dummy: Sequence[Tensor]) -> Tensor:
        """The distance that ranks and reports iterates: every tensor, no weights, no masks, detached."""
        with torch.no_grad():
            return self.distance([g.detach() for g in dummy], self.targets, None, None)

    def _prepared_distance(self) -> Optional[Callable[[Sequence[Tensor]], Tensor]]:
        key = (self.distance, self.targets, self.weights, self.masks)
        cached = self._prepared
        if cached is not None and all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        fn = prepare_distance(self.distance, self.targets, self.weights, self.masks)
        self._prepared = (key, fn)
        return fn

    # ------------------------------------------------------------------ best-iterate tracking
    def on_reset_best(self, listener: Callable[[], None]) -> None:
        """Register what :meth:`reset_best` calls (the owning attack's best-iterate reset)."""
        self._best_listeners.append(listener)

    def reset_best(self) -> None:
        """The objective changed on purpose (e.g. a new matched set): the owner restarts its best-iterate tracking,
        so the returned iterate comes from the current stage."""
        for listener in self._best_listeners:
            listener()
