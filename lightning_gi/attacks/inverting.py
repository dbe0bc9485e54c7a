"""Inverting Gradients (Geiping et al. 2020) and a GradInversion-style recipe (Yin et al. 2021).

Both are :class:`~lightning_gi.attacks.image_prior.ImagePriorAttack` with paper defaults (a ``recipe``: the
defaults of the arguments left at None); they take exactly ImagePriorAttack's arguments, and every default can
be overridden from a config.

Inverting Gradients (Geiping et al., NeurIPS 2020, Eq. 4)::

    argmin_{x in [0,1]^n}  1 - <grad_W L(x, y), g> / (||grad_W L(x, y)|| ||g||)  +  alpha_TV * TV(x)

cosine similarity over all gradient tensors at once, anisotropic L1 total variation, Adam (lr 0.1) on the
SIGN of the gradient, the images boxed to the valid range after each step, MultiStepLR (gamma 0.1) at 3/8,
5/8 and 7/8 of the run (24,000 iterations in the paper), several restarts of which the one with the lowest
matching loss wins; labels from the gradient (iDLG rule).

GradInversion (Yin et al., CVPR 2021, Eq. 2-6, without the group-consistency term)::

    argmin_x  ||grad_W L(x, y) - g||^2 + a_BN R_BN(x) + a_TV R_TV(x) + a_l2 ||x||^2

with labels from the negative rows of the last layer's weight gradient (distinct labels in the batch),
R_BN the distance of the batch statistics at every BatchNorm layer to the running statistics (first
layer up-weighted), Adam lr 0.1. Peer settings: BN 0.1 (first BN x10), TV 1e-4, l2 1e-6, 20k iterations.
"""
from __future__ import annotations

from typing import Any, ClassVar

from ..objectives.distances import CosineDistance, SquaredL2Distance
from ..objectives.priors import BNStatisticsPrior, L2ImageNorm, TotalVariation
from .image_prior import INVERTING_GRADIENTS_MILESTONES, ImagePriorAttack
from .update_rules import SignedGradient

__all__ = ["InvertingGradients", "GradInversion", "VectorisedRestartsAttack", "VectorisedInvertingGradients"]


class InvertingGradients(ImagePriorAttack):
    """Inverting Gradients (Geiping et al. 2020): cosine distance + TV, signed Adam, boxed, MultiStepLR, restarts.

    :class:`ImagePriorAttack`'s arguments; left at None they take the paper's values: Adam lr 0.1,
    ``milestone_fractions=[3/8, 5/8, 7/8]`` (``[]``: none; ignored when an ``lr_scheduler`` is given),
    ``lr_gamma=0.1``, :class:`CosineDistance` (global), ``priors=[TotalVariation(weight=1e-4)]`` (``[]``: none),
    ``update_rule=SignedGradient()``, ``boxed=True``, labels from :class:`~lightning_gi.labels.AutoLabels`.
    """

    recipe: ClassVar[dict[str, Any]] = {
        "milestone_fractions": list(INVERTING_GRADIENTS_MILESTONES),
        "distance": CosineDistance,
        "priors": lambda: [TotalVariation(weight=1e-4)],
        "update_rule": SignedGradient,
        "boxed": True,
        "auto_labels": True,
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)


class GradInversion(ImagePriorAttack):
    """GradInversion-style recipe (Yin et al. 2021; group consistency not included).

    :class:`ImagePriorAttack`'s arguments; left at None: Adam lr 0.1, no schedule, :class:`SquaredL2Distance`,
    ``priors=[BNStatisticsPrior(0.1, first_bn_multiplier=10), TotalVariation(1e-4), L2ImageNorm(1e-6)]``,
    unsigned, not boxed, labels from :class:`~lightning_gi.labels.AutoLabels`. The victim must have BatchNorm
    layers (their running statistics are the prior's targets).
    """

    recipe: ClassVar[dict[str, Any]] = {
        "distance": SquaredL2Distance,
        "priors": lambda: [
            BNStatisticsPrior(weight=0.1, first_bn_multiplier=10.0), TotalVariation(weight=1e-4), L2ImageNorm(weight=1e-6)
        ],
        "auto_labels": True,
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)


class VectorisedRestartsAttack(ImagePriorAttack):
    """:class:`ImagePriorAttack` with ``restart_mode="vectorised"`` forced (kept for configs that name it; prefer
    ``restart_mode: vectorised`` on any image-prior attack: vectorisation is an option of the core)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["restart_mode"] = "vectorised"
        super().__init__(**kwargs)


class VectorisedInvertingGradients(InvertingGradients):
    """:class:`InvertingGradients` with ``restart_mode="vectorised"`` forced (kept for configs that name it)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["restart_mode"] = "vectorised"
        super().__init__(**kwargs)
