"""Counting labels from the last layer's bias gradient: iLRG (Ma et al., ICLR 2023) and its uniform estimate.

For cross-entropy over a batch of ``N`` samples with softmax probabilities ``p_i`` and one-hot labels
``y_i``, the gradient of the SUMMED loss with respect to the last layer's bias is

    g_c = sum_i (p_ic - y_ic) = S_c - n_c,        S_c = sum_i p_ic,  n_c = #{i : y_i = c}      (1)

(for a mean-reduced loss the observed gradient is ``g / N``). So the counts are ``n_c = S_c - g_c``
exactly; what is unknown is ``S_c``, the batch sum of the predicted probability of class ``c``.

* :class:`BiasCounts` estimates ``S_c ~ N / C`` (probabilities ~ uniform: an untrained or early network),
  i.e. ``n_c = N/C - g_c``, then rounds with the sum fixed to ``N``.
* :class:`ILRG` estimates ``S_c`` from the gradient itself: the weight-gradient row ``dW_c`` divided by
  ``g_c`` is a ``(p_ic - y_ic)``-weighted mean of the penultimate features, dominated by the samples of
  class ``c`` (``e_c``, iLRG's "class-wise average embedding"); pushing it through the last layer gives
  ``p_hat_c = softmax(W e_c + b)``, the typical probability vector of a class-``c`` sample, so
  ``S_i ~ sum_j n_j p_hat_j[i]`` and (1) becomes the linear system (iLRG Eq. 8-9)

      sum_j n_j (p_hat_j[i] - delta_ij) = g_i  (i = 1..C),      sum_j n_j = N,

  solved by least squares (pseudo-inverse), then rounded with the sum fixed to ``N``. The row of a class
  the victim predicts for much of the batch is the least exact (``p_hat_j`` is the softmax of a mean
  embedding, not the mean of the samples' softmaxes, so its error is a fraction of ``S_c``): the
  rounding lets those classes absorb the leftover units (:meth:`ILRG.uncertainty`).

Both need a bias in the victim's last (linear) layer.
"""
from __future__ import annotations

import logging
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..observation import GradientObservation, ObservationError
from .base import LabelStrategy, classifier_gradients, last_linear, loss_scale

log = logging.getLogger("lightning_gi.labels")

__all__ = ["round_counts", "solve_count_system", "counts_to_label_vector", "BiasCounts", "ILRG"]


def round_counts(x: np.ndarray | Tensor, total: int, scale: Optional[np.ndarray | Tensor] = None) -> np.ndarray:
    """Non-negative integer counts closest to ``x`` with ``sum == total``.

    Minimises ``sum_c ((k_c - x_c) / scale_c)^2`` over non-negative integers ``k`` summing to ``total``
    (negative entries of ``x`` act as 0). Each entry starts at its nearest integer; the missing (or extra)
    units then go to (come from) the entries where that costs least. ``scale`` is the uncertainty of each
    entry: an uncertain entry absorbs the rounding before a precise one. Without ``scale`` (all equal)
    this is largest-remainder rounding.
    """
    v = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), 0.0, None)
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if v.size == 0:
        raise ValueError("need at least one class to round counts over")
    if scale is None:
        weight = np.ones_like(v)
    else:
        sigma = np.asarray(scale, dtype=np.float64).reshape(-1)
        if sigma.shape != v.shape or not (np.isfinite(sigma).all() and (sigma > 0).all()):
            raise ValueError(f"scale must hold {v.size} finite positive values, one per entry of x")
        weight = 1.0 / sigma**2
    k = np.floor(v + 0.5).astype(np.int64)
    missing = int(total - k.sum())
    if abs(missing) > v.size:
        # far from the sum (e.g. an ill-conditioned least-squares solution): start from the floor of the
        # continuous optimum y = max(0, x - lam / weight), sum(y) = total (lam by bisection), so the unit
        # steps below are at most one per entry instead of |missing|
        lo, hi = (0.0, float((v * weight).max())) if missing < 0 else (-float(total) * float(weight.max()), 0.0)
        for _ in range(200):
            lam = 0.5 * (lo + hi)
            if np.clip(v - lam / weight, 0.0, None).sum() > total:
                lo = lam
            else:
                hi = lam
        k = np.floor(np.clip(v - hi / weight, 0.0, None)).astype(np.int64)
        missing = int(total - k.sum())
    # the cost of one more (one fewer) unit at c is weight_c * (1 +/- 2 (k_c - x_c)): convex, so greedy is optimal
    while missing > 0:
        c = int(np.argmin(weight * (1.0 + 2.0 * (k - v))))
        k[c] += 1
        missing -= 1
    while missing < 0:
        cost = np.where(k > 0, weight * (1.0 - 2.0 * (k - v)), np.inf)
        c = int(np.argmin(cost))
        k[c] -= 1
        missing += 1
    return k


def solve_count_system(p_hat: Tensor, g: Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """iLRG's system (Eq. 8-9) ``sum_j n_j (p_hat_j[i] - delta_ij) = g_i``, ``sum_j n_j = N``: (the matrix
    ``p_hat^T - I`` [C, C], the minimum-norm least-squares counts before rounding). ``p_hat`` [C, C] float64,
    row ``j`` = the probability vector of a class-``j`` sample; ``g`` = the summed-loss bias gradient."""
    c = g.numel()
    a = (p_hat.T - torch.eye(c, dtype=torch.float64)).numpy()
    system = np.vstack([a, np.ones((1, c))])
    rhs = np.concatenate([g.numpy(), [float(n)]])
    return a, np.linalg.pinv(system) @ rhs


def counts_to_label_vector(counts: np.ndarray) -> Tensor:
    """Each class ``c`` repeated ``counts[c]`` times, sorted by class."""
    return torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts, dtype=torch.long))


def _bias_gradient(observation: GradientObservation, model: nn.Module, who: str) -> tuple[Tensor, Tensor]:
    weight, bias = classifier_gradients(observation, model)
    if bias is None:
        raise ObservationError(f"{who} needs a bias in the victim's last linear layer; this one has none (use 'auto')")
    return weight.detach().double().cpu(), bias.detach().double().cpu()


class BiasCounts(LabelStrategy):
    """iLRG's uniform-probability estimate: ``n_c = round(N/C - g_c)`` with ``g = N * dL/db`` (mean loss).

    Eq. (1) of the module docs with ``S_c = N/C``; exact while the victim's predictions are close to
    uniform (untrained / early training), at any batch size. Rounded with the sum fixed to ``N``.

    Args:
        loss_reduction: "mean" or "sum" reduction of the client's loss; None (default) reads it from the
            observation (``GradientObservation.loss_reduction``).

    Diagnostics: ``implied_counts`` (before rounding) and ``rounding_residual_max`` (max ``|implied - n|``).
    """

    def __init__(self, loss_reduction: Optional[Literal["mean", "sum"]] = None) -> None:
        if loss_reduction not in (None, "mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or None, got {loss_reduction!r}")
        self.loss_reduction = loss_reduction

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        _, db = _bias_gradient(observation, model, "BiasCounts")
        n = observation.batch_size
        g = loss_scale(observation, self.loss_reduction) * db
        implied = n / db.numel() - g
        counts = round_counts(implied.numpy(), n)
        self.note(
            implied_counts=[round(float(v), 4) for v in implied],
            rounding_residual_max=float(np.abs(implied.numpy() - counts).max()),
        )
        return counts_to_label_vector(counts)


class ILRG(LabelStrategy):
    """Full iLRG (Ma et al., ICLR 2023): class embeddings, their softmax, and the count system (module docs).

    Args:
        loss_reduction: "mean"/"sum" of the client's loss; None reads it from the observation.
        min_bias_gradient: classes with ``|g_c| < min_bias_gradient`` (in samples: ``S_c`` and ``n_c``
            agree to within that) have an ill-conditioned embedding ``dW_c / g_c``; their ``p_hat_c`` is
            replaced by the mean ``p_hat`` of the well-conditioned classes (the reference code clips the
            ratio's exponent instead). Default 2.
        refine_steps: extension, not in the paper (default 0: off). Each step re-estimates the class MEAN
            features ``mu_j`` of the present classes by least squares from
            ``S * dW = sum_j (p_hat_j - e_j) n_j mu_j^T`` (undoing the mix of members and non-members in
            ``e_j``), sets ``p_hat_j = softmax(W mu_j + b)`` and solves for the counts again. If the first
            step (rows weighted by ``1 / uncertainty``) gives back the paper's counts, they are a fixed
            point and are kept (the iteration can oscillate away from a right answer); otherwise the
            iteration goes on (rows weighted equally) and the iterate whose rounded counts best satisfy
            their own system (smallest ``system_residual``) is kept.
        rounding: "uncertainty" (default) rounds the least-squares counts with the sum fixed to ``N``,
            letting the classes whose row of the system is least exact absorb the rounding (cost
            ``sum_c ((k_c - x_c) / (S_c + uncertainty_floor))^2``, ``S_c = g_c + x_c`` the class's predicted
            mass in the batch; see :meth:`uncertainty`); "largest_remainder": the paper's plain rounding,
            which moves a unit into or out of the wrong class when one class takes most of the
            predictions (DLG's LeNet, an untrained ResNet-34 in eval mode) at batch >= 64.
        uncertainty_floor: the part of each class's uncertainty that does not grow with ``S_c`` (samples).

    Diagnostics: ``implied_counts`` (least-squares solution before rounding), ``system_residual``
    (``max_i |sum_j n_j (p_hat_j[i] - delta_ij) - g_i|`` for the rounded counts, in samples),
    ``system_residual_unrounded``, ``ill_conditioned_classes``, ``mean_p_hat_diagonal`` (the typical
    confidence of the victim on its own class: near ``1/C`` untrained, near 1 when it has converged),
    ``refine_steps_run``.
    """

    def __init__(
        self,
        loss_reduction: Optional[Literal["mean", "sum"]] = None,
        min_bias_gradient: float = 2.0,
        refine_steps: int = 0,
        rounding: Literal["uncertainty", "largest_remainder"] = "uncertainty",
        uncertainty_floor: float = 0.1,
    ) -> None:
        if loss_reduction not in (None, "mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or None, got {loss_reduction!r}")
        if not min_bias_gradient >= 0:
            raise ValueError(f"min_bias_gradient must be >= 0, got {min_bias_gradient}")
        if refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
        if rounding not in ("uncertainty", "largest_remainder"):
            raise ValueError(f"rounding must be 'uncertainty' or 'largest_remainder', got {rounding!r}")
        if not uncertainty_floor > 0:
            raise ValueError(f"uncertainty_floor must be > 0, got {uncertainty_floor}")
        self.rounding = rounding
        self.uncertainty_floor = float(uncertainty_floor)
        self.loss_reduction = loss_reduction
        self.min_bias_gradient = float(min_bias_gradient)
        self.refine_steps = int(refine_steps)

    @torch.no_grad()
    def class_probabilities(self, dw: Tensor, g: Tensor, model: nn.Module) -> tuple[Tensor, Tensor]:
        """``p_hat`` ``[C, C]`` (row c: softmax of the last layer at class c's embedding) and the ill-conditioned mask."""
        head = last_linear(model)
        weight = head.weight.detach().double().cpu()
        bias = head.bias.detach().double().cpu()
        bad = g.abs() < self.min_bias_gradient
        safe = torch.where(bad, torch.ones_like(g), g)
        # dW_c / db_c == (S * dW_c) / g_c for either reduction: S cancels in the ratio
        emb = dw / safe.unsqueeze(1)
        p_hat = torch.softmax(emb @ weight.T + bias, dim=1)
        if bool(bad.all()):
            p_hat[:] = 1.0 / g.numel()
        elif bool(bad.any()):
            p_hat[bad] = p_hat[~bad].mean(dim=0)
        return p_hat, bad

    def _solve(self, p_hat: Tensor, g: Tensor, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(system matrix ``p_hat^T - I``, least-squares counts with the sum row, rounded counts)."""
        a, solution = solve_count_system(p_hat, g, n)
        return a, solution, round_counts(solution, n, self.uncertainty(solution, g))

    def uncertainty(self, solution: np.ndarray, g: Tensor) -> Optional[np.ndarray]:
        """Per-class scale of the count error: ``S_c + floor`` (None for largest-remainder rounding).

        ``S_c = g_c + n_c`` (Eq. 1), here from the unrounded counts, is the class's predicted mass in
        the batch. Row ``c`` of the system estimates it as ``sum_j n_j p_hat_j[c]``, and ``p_hat_j`` is the
        softmax of a MEAN embedding, not the mean of the samples' softmaxes: the error is a fraction of
        ``S_c``. A class the victim predicts for much of the batch (DLG's LeNet or an untrained ResNet-34
        in eval mode, one class at p ~ 0.6-0.9) carries an error of whole samples, the others almost none.
        """
        if self.rounding == "largest_remainder":
            return None
        return np.clip(g.numpy() + solution, 0.0, None) + self.uncertainty_floor

    @staticmethod
    def _residual(a: np.ndarray, counts: np.ndarray, g: Tensor) -> float:
        return float(np.abs(a @ counts - g.numpy()).max())

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        dw, db = _bias_gradient(observation, model, "ILRG")
        n = observation.batch_size
        scale = loss_scale(observation, self.loss_reduction)
        g = scale * db
        p_hat, bad = self.class_probabilities(dw * scale, g, model)
        a, solution, counts = self._solve(p_hat, g, n)
        best = (self._residual(a, counts, g), a, solution, counts, p_hat)
        refined_steps = 0
        if self.refine_steps:
            head = last_linear(model)
            weight, bias = head.weight.detach().double().cpu(), head.bias.detach().double().cpu()
            gw = (dw * scale).numpy()
            for step in range(self.refine_steps):
                present = np.flatnonzero(counts > 0)
                # S * dW = sum_j (p_hat_j - e_j) n_j mu_j^T: least-squares class means mu_j of the present
                # classes. The first step (the fixed-point check of the paper's counts) weights each row by
                # 1 / its uncertainty, like the rounding; the later steps weight rows equally, which measured
                # better once the paper's counts are off (early training, docs/labels.md)
                sigma = self.uncertainty(solution, g) if step == 0 else None
                w = np.ones(len(counts)) if sigma is None else 1.0 / sigma
                mu = np.linalg.lstsq(w[:, None] * a[:, present] * counts[present][None, :], w[:, None] * gw, rcond=None)[0]
                p_hat = p_hat.clone()
                p_hat[present] = torch.softmax(torch.from_numpy(mu) @ weight.T + bias, dim=1)
                previous = counts
                a, solution, counts = self._solve(p_hat, g, n)
                refined_steps = step + 1
                if step == 0 and np.array_equal(counts, previous):
                    break  # the paper's counts are a fixed point of the refinement: keep them
                if self._residual(a, counts, g) < best[0]:
                    best = (self._residual(a, counts, g), a, solution, counts, p_hat)
            # the most self-consistent iterate: smallest residual of its own count system
            _, a, solution, counts, p_hat = best
        self.note(
            implied_counts=[round(float(v), 4) for v in solution],
            system_residual=float(np.abs(a @ counts - g.numpy()).max()),
            system_residual_unrounded=float(np.abs(a @ solution - g.numpy()).max()),
            ill_conditioned_classes=[int(i) for i in torch.nonzero(bad).flatten()],
            mean_p_hat_diagonal=float(p_hat.diagonal().mean()),
            refine_steps_run=refined_steps,
        )
        return counts_to_label_vector(counts)
