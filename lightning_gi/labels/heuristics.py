"""Greedy and distinct-label rules from the literature, as implemented (with fixes) in breaching's label strategies.

Notation: ``G`` = gradient of the SUMMED cross-entropy (``N`` times the observed gradient for a
mean-reduced loss), ``r_c = sum_k G_W[c, k]`` the row sums of the last layer's weight gradient,
``G_b`` its bias gradient. With non-negative penultimate features ``h`` (ReLU/sigmoid),
``r_c = sum_i (p_ic - y_ic) |h_i|_1``: each sample of class ``c`` pulls ``r_c`` down by about
``(1 - p_ic) |h_i|_1``, every other sample pushes it up by ``p_ic |h_i|_1``.

* :class:`LLG` (Wainakh et al., PoPETs 2022, "User-level label leakage from gradients in federated
  learning", Alg. 1): impact ``m = (1 + 1/C) / N * sum_{c: r_c < 0} r_c``; stage 1 takes every class
  with ``r_c < 0`` once and adds ``-m`` to its row sum; stage 2 repeatedly takes ``c* = argmin r`` and
  adds ``-m`` to ``r_{c*}`` (the CURRENT index: breaching's stage 2 updates the stale index of the
  stage-1 loop instead, so the same class is picked again and again).
* :class:`WainakhLabels` (LLG+, same paper): impact and offset measured on the victim model with dummy
  inputs of known labels, then the same greedy on the offset-corrected row sums.
* :class:`BiasCorrectedLabels` (breaching's ``bias-corrected``): the same two-stage greedy on the bias
  gradient ``G_b`` with impact ``m = sum_{c: G_b,c < 0} G_b,c / N``.
* :class:`YinLabels` (Yin et al., CVPR 2021, GradInversion Eq. 6): distinct labels, the ``N`` classes
  whose weight-gradient row has the most negative MINIMUM entry (``reduce="sum"``: row sum).
"""
from __future__ import annotations

import copy
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..observation import GradientObservation, ObservationError
from .base import LabelStrategy, classifier_gradients, last_linear, loss_scale

__all__ = ["greedy_impact_labels", "LLG", "WainakhLabels", "BiasCorrectedLabels", "YinLabels"]


def greedy_impact_labels(
    scores: Tensor, batch_size: int, impact: Tensor | float, stage_one: Optional[Tensor] = None
) -> Tensor:
    """Two-stage greedy of LLG: negatives once each, then argmin; every pick adds ``-impact`` to its own score.

    ``impact`` (negative: a sample lowers its class's score) is a scalar or one value per class.
    ``stage_one``: the scores whose negative entries name the stage-1 classes (default ``scores``). When
    more classes are negative than ``batch_size``, the ``batch_size`` most negative are returned.
    """
    s = scores.detach().double().cpu().clone()
    first = s if stage_one is None else stage_one.detach().double().cpu()
    m = torch.as_tensor(impact, dtype=torch.float64).expand_as(s).clone()
    negative = torch.nonzero(first < 0).flatten()
    if negative.numel() >= batch_size:
        return negative[torch.argsort(first[negative])[:batch_size]].sort().values
    labels = negative.tolist()
    s[negative] -= m[negative]
    while len(labels) < batch_size:
        c = int(torch.argmin(s))
        labels.append(c)
        s[c] -= m[c]  # the class just picked (not a stale index)
    return torch.tensor(sorted(labels), dtype=torch.long)


def _row_sums(observation: GradientObservation, model: nn.Module) -> Tensor:
    weight, _ = classifier_gradients(observation, model)
    return weight.detach().double().cpu().sum(dim=1) * loss_scale(observation)


class LLG(LabelStrategy):
    """LLG (Wainakh et al. 2022): negative row sums first, then greedy with the impact ``m`` (module docs).

    ``m = (1 + 1/C) * sum_{r_c<0} r_c / N``. Diagnostics: ``impact``, ``row_sums`` (summed-loss units).
    """

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        r = _row_sums(observation, model)
        n, c = observation.batch_size, r.numel()
        m = float(r.clamp_max(0).sum()) * (1 + 1 / c) / n
        self.note(impact=m, row_sums=[round(float(v), 6) for v in r])
        return greedy_impact_labels(r, n, m)


class WainakhLabels(LabelStrategy):
    """LLG+ (Wainakh et al. 2022, white-box): impact and offset measured on the victim with dummy inputs.

    For each class ``c``: a dummy batch of ``dummy_size`` inputs all labelled ``c`` gives the per-sample
    impact ``m_c`` (the mean of ``(p_c - 1)|h|_1``, row ``c``'s sum of the per-sample gradient); a batch of
    one input of every other class gives the per-sample offset ``o_c`` (mean ``p_c |h|_1``). Then
    ``r_c ~ n_c m_c + (N - n_c) o_c``, so the greedy of :class:`LLG` runs on ``r_c - N o_c`` with impact
    ``m_c - o_c`` (stage 1, as in the paper: the classes whose RAW row sum is negative). (breaching's ``wainakh-whitebox`` sums ALL rows for ``m``, which is ~0 for softmax
    cross-entropy; this follows the paper's per-class impact instead.)

    Args:
        input_shape: shape of one victim input ``(C, H, W)`` (victim input space).
        dummy_size: dummy inputs per class for the impact.
        dummy: "normal" N(0, 1) or "uniform" U(0, 1) dummy inputs.
        seed: seed of the dummy inputs.
        cache: measure impact/offset once and reuse them on later calls (only valid while the victim's
            weights do not change, e.g. many observations of one model state).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        dummy_size: int = 8,
        dummy: Literal["normal", "uniform"] = "normal",
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        if len(input_shape) < 1 or any(int(s) < 1 for s in input_shape):
            raise ValueError(f"input_shape must be positive ints like (3, 32, 32), got {tuple(input_shape)}")
        if dummy_size < 1:
            raise ValueError(f"dummy_size must be >= 1, got {dummy_size}")
        if dummy not in ("normal", "uniform"):
            raise ValueError(f"dummy must be 'normal' or 'uniform', got {dummy!r}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dummy_size = int(dummy_size)
        self.dummy = dummy
        self.seed = int(seed)
        self.cache = bool(cache)
        self._cached: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def _row_sum_gradient(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        weight = last_linear(model).weight
        loss = F.cross_entropy(model(x), y, reduction="mean")
        (g,) = torch.autograd.grad(loss, [weight])
        return g.detach().double().cpu().sum(dim=1)  # mean over the dummy samples of the per-sample row sums

    def impact_and_offset(self, model: nn.Module, num_classes: int) -> tuple[Tensor, Tensor]:
        """Per-sample impact ``m_c`` and offset ``o_c`` ``[C]`` (summed-loss units) on a copy of ``model``."""
        model = copy.deepcopy(model)  # dummy forwards must not touch the victim's BN running statistics
        last_linear(model).weight.requires_grad_(True)
        gen = torch.Generator().manual_seed(self.seed)
        p = next(model.parameters())
        draw = torch.randn if self.dummy == "normal" else torch.rand
        impact = torch.zeros(num_classes, dtype=torch.float64)
        offset = torch.zeros(num_classes, dtype=torch.float64)
        for c in range(num_classes):
            x = draw((self.dummy_size, *self.input_shape), generator=gen).to(p.device, p.dtype)
            impact[c] = self._row_sum_gradient(model, x, torch.full((self.dummy_size,), c, device=p.device))[c]
            others = torch.tensor([k for k in range(num_classes) if k != c], device=p.device)
            if others.numel():
                x = draw((others.numel(), *self.input_shape), generator=gen).to(p.device, p.dtype)
                offset[c] = self._row_sum_gradient(model, x, others)[c]
        return impact, offset

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        r = _row_sums(observation, model)
        n, c = observation.batch_size, r.numel()
        key = (id(model), c)
        if self.cache and key in self._cached:
            impact, offset = self._cached[key]
        else:
            impact, offset = self.impact_and_offset(model, c)
            if self.cache:
                self._cached[key] = (impact, offset)
        self.note(impact=[float(v) for v in impact], offset=[float(v) for v in offset])
        # stage 1 on the raw row sums (a negative one is a present class), stage 2 offset-corrected
        return greedy_impact_labels(r - n * offset, n, impact - offset, stage_one=r)


class BiasCorrectedLabels(LabelStrategy):
    """breaching's ``bias-corrected``: LLG's two-stage greedy on the bias gradient, impact ``sum_{G_b<0} G_b / N``."""

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        _, bias = classifier_gradients(observation, model)
        if bias is None:
            raise ObservationError("BiasCorrectedLabels needs a bias in the victim's last linear layer; this one has none")
        g = bias.detach().double().cpu() * loss_scale(observation)
        n = observation.batch_size
        m = float(g.clamp_max(0).sum()) / n
        self.note(impact=m)
        return greedy_impact_labels(g, n, m)


class YinLabels(LabelStrategy):
    """GradInversion's rule (Yin et al. 2021): the ``N`` classes with the most negative row minimum (distinct labels).

    ``reduce``: "min" (paper: ``argsort(min_k dW[c, k])``) or "sum" (row sums, as iDLG).
    """

    def __init__(self, reduce: Literal["min", "sum"] = "min") -> None:
        if reduce not in ("min", "sum"):
            raise ValueError(f"reduce must be 'min' or 'sum', got {reduce!r}")
        self.reduce = reduce

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        weight, _ = classifier_gradients(observation, model)
        w = weight.detach().double().cpu()
        score = w.min(dim=1).values if self.reduce == "min" else w.sum(dim=1)
        n = observation.batch_size
        if n > score.numel():
            raise ObservationError(f"YinLabels recovers distinct labels: batch_size {n} > {score.numel()} classes")
        return torch.argsort(score)[:n].sort().values
