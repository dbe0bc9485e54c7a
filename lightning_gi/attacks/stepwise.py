"""The high-fidelity stepwise attack of Ye et al. (AAAI 2024), Stage II, on the generic image-prior attack.

Stage I (labels of the whole batch, duplicates included) is a label strategy usable by every attack:
:class:`~lightning_gi.labels.EvolutionaryLabelCounts`. Stage II is Inverting-Gradients-style image
optimisation (:class:`~lightning_gi.attacks.image_prior.ImagePriorAttack`) with

* cosine gradient distance over the matched tensors only, introduced deep -> shallow
  (:class:`~lightning_gi.callbacks.StepwiseGradientSchedule`), with a fresh dropout mask every step
  (:class:`~lightning_gi.callbacks.GradientDropout`, p = 0.3);
* priors switched on late (:class:`~lightning_gi.callbacks.PriorSchedule`: TV at 3,000 with 5e-3, BN
  statistics at 5,000 with 1e-4, the first BN layer's term x1.3 and the second's x3 as in the authors'
  ``our_res34_pretrained.yaml``);
* Adam (lr 0.1) fed the authors' *quantised sign* of the gradient (:func:`quantized_sign`), the images
  truncated to the valid range after each step, step LR decay (gamma 0.33 at 37.5/62.5/87.5 % of the run);
* one restart, eval-mode victim (BN running statistics).

The schedules are callbacks, not part of the attack, so the same attack object serves the ablation rows
(cosine only, + priors, + stepwise, + schedule); :func:`paper_callbacks` builds the authors' three
callbacks for a given budget.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..labels import AutoLabels, LabelStrategy
from ..objectives.distances import CosineDistance
from ..objectives.priors import BNStatisticsPrior, TotalVariation
from .image_prior import DistanceFn, ImagePriorAttack, _default_adam

__all__ = ["StepwiseInversion", "quantized_sign", "paper_callbacks", "STEPWISE_MILESTONES", "UPDATE_RULES", "RETURN_ITERATES"]

STEPWISE_MILESTONES = (0.375, 0.625, 0.875)
UPDATE_RULES = ("quantized_sign", "sign", "none")
RETURN_ITERATES = ("best", "last")
# authors' BN prior layer weights (MiLab-HITSZ/2023YeHFGradInv, our_res34_pretrained.yaml: deep_inversion)
AUTHORS_FIRST_BN_MULTIPLIER = 1.3
AUTHORS_SECOND_BN_MULTIPLIER = 3.0


def quantized_sign(grad: Tensor, per_first_dim: bool = False) -> Tensor:
    """The authors' gradient transform: a sign with a coarse magnitude.

    ``q = clamp(round(2 g / median|g|) / 2, -1, 1)`` takes values in {0, +-0.5, +-1}; the result is
    ``0.8 q + 0.2 sign(g)``, so every nonzero entry moves, entries >= 0.75 median|g| by the full step.
    The median is over the whole tensor, or over each slice ``grad[r]`` with ``per_first_dim`` (restarts);
    where it is 0 the plain sign is returned.
    """
    a = grad.abs()
    if per_first_dim:
        med = a.flatten(1).median(dim=1).values.view(-1, *([1] * (grad.dim() - 1)))
    else:
        med = a.median()
    safe = torch.where(med > 0, med, torch.ones_like(med))
    q = torch.clamp(torch.round(grad / safe * 2.0) / 2.0, -1.0, 1.0)
    out = 0.8 * q + 0.2 * torch.sign(grad)
    return torch.where(med > 0, out, torch.sign(grad))


class StepwiseInversion(ImagePriorAttack):
    """Ye et al. (2024) Stage II: quantised-sign Adam, truncation, step LR decay; schedules via callbacks.

    Args (all have the authors' defaults):
        optimizer: Adam, lr 0.1.
        lr_scheduler / milestone_fractions / lr_gamma: step decay at 37.5/62.5/87.5 % with gamma 0.33.
        label_strategy: None means :class:`~lightning_gi.labels.AutoLabels`: exact counts from the last layer's
            bias gradient (iLRG, Ma et al. 2023) when the head has a bias, else Stage I's
            :class:`~lightning_gi.labels.EvolutionaryLabelCounts` with auxiliary
            statistics computed on the victim from bundled photographs at the victim's image size and
            normalisation (pass one with ``stats_path`` to reuse a statistics file).
        distance: global cosine distance (:class:`CosineDistance`).
        priors: None means ``[TotalVariation(5e-3), BNStatisticsPrior(1e-4, first_bn_multiplier=1.3,
            second_bn_multiplier=3)]`` (authors' layer weights);
            without a :class:`PriorSchedule` they are on from the first step (the "+ priors" ablation row).
            ``[]`` for none.
        update_rule: "quantized_sign" (authors' code), "sign" (the paper's Eq. 12) or "none" (raw gradient).
        warmup_steps, warmup_factor: the transformed gradient is multiplied by ``warmup_factor`` during the
            first ``warmup_steps`` optimiser steps (authors: x2 for 100 steps).
        boxed: truncate the images to the valid range after each step.
        restarts, init, seed: as :class:`ImagePriorAttack` (authors: one restart, randn).
        return_iterate: which iterate is returned. "best" (default): the lowest *scoring* distance (the cosine
            distance over every gradient tensor, no stepwise weights, no dropout mask; see
            :meth:`~lightning_gi.attacks.base.GradientInversionAttack.scoring_distance`) since the last
            restart of the tracking; the stepwise schedule restarts it whenever the matched set changes, so
            this is the best iterate of the final stage. "last": the final iterate (the authors' code keeps a
            best that it resets every 500 steps, the last window included, so it returns the last iterate in
            effect); a non-finite iterate never replaces the kept one. Either way the reported
            ``matching_distance`` is the scoring distance of the returned images.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        milestone_fractions: Optional[list[float]] = list(STEPWISE_MILESTONES),
        lr_gamma: float = 0.33,
        label_strategy: Optional[LabelStrategy] = None,
        distance: Optional[DistanceFn] = None,
        priors: Optional[list[nn.Module]] = None,
        update_rule: str = "quantized_sign",
        warmup_steps: int = 100,
        warmup_factor: float = 2.0,
        boxed: bool = True,
        restarts: int = 1,
        init: str = "randn",
        seed: int = 0,
        return_iterate: Literal["best", "last"] = "best",
    ) -> None:
        if return_iterate not in RETURN_ITERATES:
            raise ValueError(f"return_iterate must be one of {RETURN_ITERATES}, got {return_iterate!r}")
        if update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {update_rule!r}")
        if warmup_steps < 0 or warmup_factor <= 0:
            raise ValueError(f"need warmup_steps >= 0 and warmup_factor > 0, got {warmup_steps}, {warmup_factor}")
        if lr_scheduler is not None:
            milestone_fractions = None
        if priors is None:
            priors = [
                TotalVariation(weight=5e-3),
                BNStatisticsPrior(
                    weight=1e-4,
                    first_bn_multiplier=AUTHORS_FIRST_BN_MULTIPLIER,
                    second_bn_multiplier=AUTHORS_SECOND_BN_MULTIPLIER,
                ),
            ]
        super().__init__(
            optimizer,
            lr_scheduler,
            milestone_fractions=milestone_fractions,
            lr_gamma=lr_gamma,
            label_strategy=label_strategy,
            distance=distance if distance is not None else CosineDistance(),
            priors=priors,
            signed_gradients=False,
            boxed=boxed,
            restarts=restarts,
            init=init,
            seed=seed,
        )
        self._default_labels = label_strategy is None
        self.update_rule = update_rule
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.return_iterate = return_iterate

    # ------------------------------------------------------------------ labels (Stage I by default)
    def recover_labels(self) -> Optional[Tensor]:
        if self._default_labels:
            c, h, _ = self.inputs.image_shape
            if c != 3:
                raise ValueError("the default label strategy (AutoLabels) uses RGB auxiliary photographs: pass a label_strategy")
            self.label_strategy = AutoLabels(
                image_size=h, mean=self.inputs.mean.flatten().tolist(), std=self.inputs.std.flatten().tolist()
            )
            self._default_labels = False
        return super().recover_labels()

    # ------------------------------------------------------------------ returned iterate
    def update_best(self, distance: Tensor, images: Tensor) -> None:
        """"best": the base rule (lowest scoring distance). "last": every finite iterate replaces the kept one."""
        if self.return_iterate == "last":
            finite = torch.isfinite(distance)
            self.restart_best_loss = torch.where(finite, torch.full_like(self.restart_best_loss, math.inf), self.restart_best_loss)
        super().update_best(distance, images)

    # ------------------------------------------------------------------ update rule
    def transform_gradient(self, grad: Tensor, step: int) -> Tensor:
        """The update direction fed to Adam for one unknown ``[R, N, C, H, W]`` (median per restart)."""
        if self.update_rule == "quantized_sign":
            out = quantized_sign(grad, per_first_dim=True)
        elif self.update_rule == "sign":
            out = torch.sign(grad)
        else:
            out = grad
        if step < self.warmup_steps and self.warmup_factor != 1.0:
            out = out * self.warmup_factor
        return out

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = int(self.trainer.global_step) if self._trainer is not None else 0
        for p in self._unknowns:
            if p.grad is not None:
                p.grad.copy_(self.transform_gradient(p.grad, step))


def paper_callbacks(
    total_steps: int = 15_000,
    num_tensors: Optional[int] = None,
    dropout: float = 0.3,
    tv_weight: float = 5e-3,
    bn_weight: float = 1e-4,
    seed: int = 0,
) -> list[Any]:
    """The authors' three schedules, scaled to ``total_steps`` (their run: 15,000).

    Stepwise: with ``num_tensors`` (the victim's number of parameter tensors) the authors' ResNet-34 indices
    (100 -> 25 of 110, every 500 of 15,000 steps) become fractions of it (``unit="fraction"``); without, the
    absolute indices are used (ResNet-34). Priors: TV on at 20 % (3,000/15,000), BN at 33 % (5,000/15,000).
    """
    from ..callbacks.schedules import GradientDropout, PriorSchedule, PriorSwitch, StepwiseGradientSchedule

    scale = total_steps / 15_000
    every = max(1, round(500 * scale))
    if num_tensors is None:
        stepwise = StepwiseGradientSchedule(start=100, stop=25, decrement=10, every=every)
    else:
        # 1-based index s of 110 <-> first 0-based index s-1 <-> fraction (s-1)/110
        stepwise = StepwiseGradientSchedule(start=99 / 110, stop=24 / 110, decrement=10 / 110, every=every, unit="fraction")
    switches = [
        PriorSwitch("TotalVariation", max(0, round(3000 * scale)), tv_weight),
        PriorSwitch("BNStatisticsPrior", max(0, round(5000 * scale)), bn_weight),
    ]
    return [stepwise, GradientDropout(p=dropout, seed=seed), PriorSchedule(switches)]
