"""Loss schedules as Lightning callbacks (Ye et al., AAAI 2024, Stage II), for ANY attack.

An attack (:class:`~lightning_gi.attacks.base.GradientInversionAttack`) owns a public matching objective,
``pl_module.objective`` (:class:`~lightning_gi.objectives.matching.MatchingObjective`). These callbacks change it
only through its methods, before every training step (``on_train_batch_start``, so they act through the Trainer,
with optimiser step ``trainer.global_step`` = 0, 1, ...):

* ``objective.set_weights(...)``: one weight per gradient tensor (``model.parameters()`` order); 0 removes
  the tensor from the distance. :class:`StepwiseGradientSchedule` introduces tensors deep -> shallow.
* ``objective.set_masks(...)``: one 0/1 mask per tensor (or None); the distance multiplies BOTH gradients
  by it (dot product and both norms for cosine). :class:`GradientDropout` draws fresh masks every step.
* ``objective.set_prior_weight(i, w)``: :class:`PriorSchedule` switches priors on at given steps.
* ``objective.reset_best()``: the matched set changed, the attack restarts its best-iterate tracking.

Weights and masks shape only the distance that is *optimised*. The attack scores iterates (best-iterate
tracking, the final iterate) and reports ``matching_distance`` with its scoring distance: every tensor, no
weights, no masks (:meth:`~lightning_gi.attacks.base.GradientInversionAttack.scoring_distance`), so scores
of steps with different masks or matched sets are comparable and the output does not depend on the schedule.

Callback order: put :class:`StepwiseGradientSchedule` before :class:`GradientDropout` in the callbacks
list (dropout then draws masks only for the tensors matched at this step); in the other order dropout
draws masks for every tensor, which is equally correct but costs more random numbers.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from torch import Tensor

__all__ = ["StepwiseGradientSchedule", "GradientDropout", "PriorSchedule", "PriorSwitch", "stepwise_start_index"]


def _objective(pl_module: pl.LightningModule) -> Any:
    """The attack's public :class:`~lightning_gi.objectives.matching.MatchingObjective`."""
    objective = getattr(pl_module, "objective", None)
    if objective is None or not hasattr(objective, "set_weights"):
        raise TypeError(f"{type(pl_module).__name__} has no matching objective: schedules need a GradientInversionAttack")
    return objective


def _param_names(pl_module: pl.LightningModule) -> list[str]:
    names = getattr(pl_module.observation, "param_names", None)
    if names:
        return list(names)
    return [n for n, _ in pl_module.victim.named_parameters()]


def stepwise_start_index(step: int, start: int, stop: int, decrement: int, every: int) -> int:
    """``max(stop, start - decrement * (step // every))``: the first matched tensor at optimiser ``step``."""
    return max(stop, start - decrement * (step // every))


class StepwiseGradientSchedule(pl.Callback):
    """Match only the deepest gradient tensors, then introduce shallower ones on a schedule.

    Three ways to say which tensors (``model.parameters()`` order, deepest = last):

    * ``unit="index"`` (authors' ResNet-34 setting, 110 tensors): tensors with 1-based index ``>= s(t)``
      are matched, ``s(t) = max(stop, start - decrement * (t // every))`` with ``start=100, stop=25,
      decrement=10, every=500``.  (``one_based=False`` reads the numbers as 0-based indices.)
    * ``unit="fraction"``: the same formula on fractions of the number ``P`` of tensors; the first matched
      0-based index is ``floor(s(t) * P)`` (e.g. ``start=0.9, stop=0.22, decrement=0.09``).
    * ``blocks``: a list of parameter-name prefixes, deep -> shallow (e.g. ``["fc", "layer4", "layer3",
      "layer2"]``); stage ``k = t // every`` matches every tensor whose name starts with one of the first
      ``k + 1`` prefixes (and no other). ``start``/``stop``/``decrement``/``unit`` are then ignored.

    Each time the matched set changes, the attack's best-iterate tracking restarts (``best_loss`` = inf), so
    the returned iterate comes from the final stage, the one the recipe means to end on (the scores themselves
    are comparable across stages: they use every tensor, unmasked; ``reset_best=False`` keeps the best over
    the whole run).  ``trainer.global_step`` at the switch is recorded in :attr:`history` as
    ``(step, matched indices)``.
    """

    def __init__(
        self,
        start: float = 100,
        stop: float = 25,
        decrement: float = 10,
        every: int = 500,
        unit: str = "index",
        one_based: bool = True,
        blocks: Optional[list[str]] = None,
        reset_best: bool = True,
    ) -> None:
        if unit not in ("index", "fraction"):
            raise ValueError(f"unit must be 'index' or 'fraction', got {unit!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if decrement < 0:
            raise ValueError(f"decrement must be >= 0, got {decrement}")
        if blocks is None:
            if stop > start:
                raise ValueError(f"stop ({stop}) must not exceed start ({start}): tensors are introduced deep -> shallow")
            if unit == "fraction" and not (0.0 <= stop <= start <= 1.0):
                raise ValueError(f"fractions must satisfy 0 <= stop <= start <= 1, got start={start}, stop={stop}")
        elif not blocks:
            raise ValueError("blocks must name at least one parameter prefix")
        self.start, self.stop, self.decrement = start, stop, decrement
        self.every = int(every)
        self.unit = unit
        self.one_based = bool(one_based)
        self.blocks = list(blocks) if blocks is not None else None
        self.reset_best = bool(reset_best)
        self.history: list[tuple[int, list[int]]] = []
        self._current: Optional[tuple[int, ...]] = None

    def matched_indices(self, step: int, num_tensors: int, names: Optional[Sequence[str]] = None) -> list[int]:
        """0-based indices of the tensors matched at optimiser ``step``."""
        if self.blocks is not None:
            if names is None:
                raise ValueError("block schedules need parameter names")
            stage = min(step // self.every, len(self.blocks) - 1)
            prefixes = self.blocks[: stage + 1]
            out = [i for i, n in enumerate(names) if any(n == p or n.startswith(p + ".") for p in prefixes)]
            if not out:
                raise ValueError(f"no parameter name starts with any of {prefixes}; names are e.g. {list(names)[:4]}...")
            return out
        s = stepwise_start_index(step, self.start, self.stop, self.decrement, self.every) if self.unit == "index" else max(
            self.stop, self.start - self.decrement * (step // self.every)
        )
        if self.unit == "index":
            first = int(s) - (1 if self.one_based else 0)
        else:
            first = int(math.floor(s * num_tensors + 1e-9))
        first = min(max(first, 0), num_tensors - 1)  # at least the last tensor is matched
        return list(range(first, num_tensors))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        objective = _objective(pl_module)
        n = objective.num_tensors
        names = _param_names(pl_module) if self.blocks is not None else None
        matched = self.matched_indices(trainer.global_step, n, names)
        key = tuple(matched)
        if key != self._current:
            self._current = key
            keep = set(matched)
            objective.set_weights([1.0 if i in keep else 0.0 for i in range(n)])
            self.history.append((int(trainer.global_step), list(matched)))
            if self.reset_best and trainer.global_step > 0:
                objective.reset_best()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = None  # a later fit() starts the schedule again


class GradientDropout(pl.Callback):
    """Drop each entry of every matched gradient tensor with probability ``p``, freshly every step.

    Sets the objective's masks (``objective.set_masks``): a bool keep-mask (``P(keep) = 1 - p``) per tensor with nonzero weight
    (None for the others); the distance applies the same mask to the dummy and the observed gradient.
    Kept entries are not rescaled (authors' code). Masks come from a generator seeded with ``seed`` on the
    attack's device, so runs are reproducible. The masks of the current step are :attr:`last_masks`.

    Args:
        p: drop probability (paper: 0.3).
        seed: seed of the mask generator.
        start_step: first optimiser step with dropout (before it: no masks).
    """

    def __init__(self, p: float = 0.3, seed: int = 0, start_step: int = 0) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must lie in [0, 1), got {p}")
        self.p = float(p)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self._generator: Optional[torch.Generator] = None
        self._all_tensors = False
        self.last_masks: Optional[list[Optional[Tensor]]] = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self._generator = torch.Generator(device=device).manual_seed(self.seed)
        cbs = list(trainer.callbacks)
        me = cbs.index(self)
        later = [c for c in cbs[me + 1 :] if isinstance(c, StepwiseGradientSchedule)]
        self._all_tensors = bool(later)
        if later:
            warnings.warn(
                "GradientDropout is listed before StepwiseGradientSchedule: masks are drawn for every tensor "
                "(correct, but slower); list the schedule first", stacklevel=2
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        objective = _objective(pl_module)
        if self.p == 0.0 or trainer.global_step < self.start_step:
            objective.set_masks(None)
            self.last_masks = None
            return
        if self._generator is None:
            self.on_train_start(trainer, pl_module)
        targets = objective.targets
        weights = None if self._all_tensors else objective.weights
        masks: list[Optional[Tensor]] = []
        for i, t in enumerate(targets):
            if weights is not None and float(weights[i]) == 0.0:
                masks.append(None)
                continue
            masks.append(torch.rand(t.shape, generator=self._generator, device=t.device) >= self.p)
        objective.set_masks(masks)
        self.last_masks = masks

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the final evaluation and the outputs never read the masks (the attack's scoring distance); this
        # only leaves no stale masks for code that calls ``matching_distance`` after fit
        _objective(pl_module).set_masks(None)
        self._generator = None


@dataclass
class PriorSwitch:
    """Switch prior ``prior`` (index in ``pl_module.priors`` or its class name) to ``weight`` at ``step``."""

    prior: Union[int, str]
    step: int
    weight: float


class PriorSchedule(pl.Callback):
    """Switch priors on (or change their weights) at given optimiser steps, for any attack.

    Every prior named in ``switches`` has weight ``initial_weight`` (default 0: off, and skipped at no cost
    by the attack) until its first switch step; from ``trainer.global_step >= step`` on it has the switch's
    ``weight`` (paper: ``lambda(t) = 1[t > T] * lambda``, i.e. on from step ``T``, counted from 0).
    Priors not named keep their configured weight. The prior must be in the attack's ``priors`` list
    (e.g. ``BNStatisticsPrior`` attaches its hooks when the attack binds the victim).

    Ye et al. (authors' code): ``[{prior: TotalVariation, step: 3000, weight: 5e-3},
    {prior: BNStatisticsPrior, step: 5000, weight: 1e-4}]``.

    :attr:`history` records ``(step, prior index, new weight)`` for every change.
    """

    def __init__(self, switches: list[PriorSwitch], initial_weight: float = 0.0) -> None:
        parsed = []
        for s in switches:
            if isinstance(s, dict):
                s = PriorSwitch(**s)
            if s.step < 0 or s.weight < 0:
                raise ValueError(f"switch steps and weights must be >= 0, got {s}")
            parsed.append(s)
        if not parsed:
            raise ValueError("PriorSchedule needs at least one switch")
        self.switches = sorted(parsed, key=lambda s: s.step)
        self.initial_weight = float(initial_weight)
        self.history: list[tuple[int, int, float]] = []
        self._resolved: list[tuple[int, int, float]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        objective = _objective(pl_module)
        self._resolved = [(s.step, objective.prior_index(s.prior), float(s.weight)) for s in self.switches]
        for _, i, _ in self._resolved:
            objective.set_prior_weight(i, self.initial_weight)

    def weight_at(self, prior_index: int, step: int) -> Optional[float]:
        """The scheduled weight of prior ``prior_index`` at ``step`` (None: not scheduled)."""
        out: Optional[float] = None
        for s, i, w in self._resolved:
            if i == prior_index:
                out = self.initial_weight if out is None else out
                if s <= step:
                    out = w
        return out

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._resolved:
            self.on_train_start(trainer, pl_module)
        objective = _objective(pl_module)
        step = int(trainer.global_step)
        for i in sorted({i for _, i, _ in self._resolved}):
            w = self.weight_at(i, step)
            if w is not None and objective.prior_weight(i) != w:
                objective.set_prior_weight(i, w)
                self.history.append((step, i, w))
