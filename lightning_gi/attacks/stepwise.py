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
from .update_rules import QuantisedSign, UpdateRule, quantized_sign  # noqa: F401 (quantized_sign re-exported)

__all__ = ["StepwiseInversion", "quantized_sign", "paper_callbacks", "STEPWISE_MILESTONES", "RETURN_ITERATES"]

STEPWISE_MILESTONES = (0.375, 0.625, 0.875)
RETURN_ITERATES = ("best", "last")
# authors' BN prior layer weights (MiLab-HITSZ/2023YeHFGradInv, our_res34_pretrained.yaml: deep_inversion)
AUTHORS_FIRST_BN_MULTIPLIER = 1.3
AUTHORS_SECOND_BN_MULTIPLIER = 3.0


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
        update_rule: the direction fed to Adam (:mod:`lightning_gi.attacks.update_rules`); None: the authors' code,
            ``QuantisedSign(warmup_steps=100, warmup_factor=2.0)`` (x2 for the first 100 steps); the paper's Eq. 12
            is ``SignedGradient()``.
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
        update_rule: Optional[UpdateRule] = None,
        boxed: bool = True,
        restarts: int = 1,
        init: str = "randn",
        seed: int = 0,
        return_iterate: Literal["best", "last"] = "best",
    ) -> None:
        if return_iterate not in RETURN_ITERATES:
            raise ValueError(f"return_iterate must be one of {RETURN_ITERATES}, got {return_iterate!r}")
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
            update_rule=update_rule if update_rule is not None else QuantisedSign(warmup_steps=100, warmup_factor=2.0),
            boxed=boxed,
            restarts=restarts,
            init=init,
            seed=seed,
        )
        self._default_labels = label_strategy is None
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
