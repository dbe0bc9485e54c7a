"""WDLG: Wasserstein Deep Leakage from Gradients (Wang et al., Entropy 2023, 25(5):810, Algorithm 2).

DLG with two changes: the labels come from a label-recovery rule instead of being optimised (the iDLG
rule; the negative-row rule for a batch of distinct labels), and the squared Euclidean gradient distance is
replaced by the Wasserstein (earth mover's) distance between dummy and observed gradients::

    x* = argmin_x  sum_l  W_1( P[grad_{W_l} L(F(x; W), y*)],  P[grad_{W_l} W] )

The paper gives no code and no closed form for W. We use the exact 1-D Wasserstein distance between the
empirical distributions of the entries of each gradient tensor (sort both flattened tensors, W1 = mean
|a_sorted - b_sorted|), summed over tensors (:class:`~lightning_gi.objectives.WassersteinDistance`). It is
position-blind within a tensor; ``WassersteinDistance(l2_weight=...)`` adds a small squared-L2 anchor.

Paper settings (Table 1): learning rate 0.1, 500 iterations, dummies from N(0, 1), LeNet. The paper's update
(Algorithm 2, line 6) is written as a gradient step ``x <- x - eta * grad_x D``; the optimiser itself is not
named. See :data:`WDLG_DEFAULT_OPTIMIZER` for our default and docs/attacks/wdlg.md for the choice.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..labels import LabelStrategy
from ..objectives.distances import WassersteinDistance
from .image_prior import DistanceFn, ImagePriorAttack

__all__ = ["WDLG"]


def _wdlg_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.1)


WDLG_DEFAULT_OPTIMIZER = "Adam(lr=0.1)"


class WDLG(ImagePriorAttack):
    """Wasserstein DLG (Wang et al. 2023): recovered labels + 1-D Wasserstein gradient distance.

    Args:
        optimizer: optimiser factory (default Adam, lr 0.1: the paper's learning rate).
        lr_scheduler: optional scheduler factory.
        label_strategy: label recovery (default iDLG rule / negative rows, :class:`IDLGLabels`).
        distance: gradient distance (default ``WassersteinDistance(p=1)``, exact 1-D W1 per tensor).
        priors: optional image priors (none in the paper).
        restarts: independent initialisations (1 in the paper).
        init: initial dummies ("randn": N(0, 1) as in the paper).
        seed: seed of the initialisation.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = _wdlg_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        label_strategy: Optional[LabelStrategy] = None,
        distance: Optional[DistanceFn] = None,
        priors: Optional[list[nn.Module]] = None,
        restarts: int = 1,
        init: str = "randn",
        seed: int = 0,
    ) -> None:
        super().__init__(
            optimizer,
            lr_scheduler,
            label_strategy=label_strategy,
            distance=distance if distance is not None else WassersteinDistance(p=1),
            priors=priors,
            restarts=restarts,
            init=init,
            seed=seed,
        )
