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

from typing import Any, ClassVar

from ..objectives.distances import WassersteinDistance
from .image_prior import ImagePriorAttack

__all__ = ["WDLG", "WDLG_DEFAULT_OPTIMIZER"]

WDLG_DEFAULT_OPTIMIZER = "Adam(lr=0.1)"


class WDLG(ImagePriorAttack):
    """Wasserstein DLG (Wang et al. 2023): recovered labels + 1-D Wasserstein gradient distance.

    :class:`ImagePriorAttack`'s arguments; left at None: Adam lr 0.1 (the paper's learning rate), labels from
    the iDLG rule / negative rows (:class:`~lightning_gi.labels.IDLGLabels`), ``WassersteinDistance(p=1)`` (exact
    1-D W1 per tensor), no priors (none in the paper), unsigned, not boxed, one restart, N(0, 1) dummies.
    """

    recipe: ClassVar[dict[str, Any]] = {"distance": lambda: WassersteinDistance(p=1)}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
