"""Inverting Gradients (Geiping et al. 2020) and a GradInversion-style recipe (Yin et al. 2021).

Both are :class:`~lightning_gi.attacks.image_prior.ImagePriorAttack` with paper defaults; every default can
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

from typing import Any, Callable, Literal, Optional

from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..labels import AutoLabels, LabelStrategy
from ..objectives.distances import CosineDistance, SquaredL2Distance
from ..objectives.priors import BNStatisticsPrior, L2ImageNorm, TotalVariation
from .image_prior import DistanceFn, INVERTING_GRADIENTS_MILESTONES, ImagePriorAttack, _default_adam

__all__ = ["InvertingGradients", "GradInversion", "VectorisedRestartsAttack", "VectorisedInvertingGradients"]


class _AutoLabelsByDefault:
    """With no ``label_strategy`` given, labels come from :class:`~lightning_gi.labels.AutoLabels` at the victim's
    input geometry: iLRG counts (Ma et al., ICLR 2023) when the last layer has a bias, which stay exact with
    duplicated labels at large batch, else the evolutionary search of Ye et al., else the iDLG rule."""

    def _use_auto_labels(self, label_strategy: Optional[LabelStrategy]) -> None:
        self._auto_labels = label_strategy is None

    def recover_labels(self) -> Optional[Tensor]:
        if getattr(self, "_auto_labels", False):
            _, size, _ = self.inputs.image_shape
            self.label_strategy = AutoLabels(
                image_size=size, mean=self.inputs.mean.flatten().tolist(), std=self.inputs.std.flatten().tolist()
            )
            self._auto_labels = False
        return super().recover_labels()  # type: ignore[misc]


class InvertingGradients(_AutoLabelsByDefault, ImagePriorAttack):
    """Inverting Gradients (Geiping et al. 2020): cosine distance + TV, signed Adam, boxed, MultiStepLR, restarts.

    Same arguments as :class:`ImagePriorAttack`, with the paper's defaults: Adam lr 0.1,
    ``milestone_fractions=[3/8, 5/8, 7/8]``, ``lr_gamma=0.1``, :class:`CosineDistance` (global),
    ``priors=None`` meaning ``[TotalVariation(weight=1e-4)]`` (pass ``[]`` for no prior),
    ``signed_gradients=True``, ``boxed=True``.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        milestone_fractions: Optional[list[float]] = list(INVERTING_GRADIENTS_MILESTONES),
        lr_gamma: float = 0.1,
        label_strategy: Optional[LabelStrategy] = None,
        distance: Optional[DistanceFn] = None,
        priors: Optional[list[nn.Module]] = None,
        signed_gradients: bool = True,
        boxed: bool = True,
        restarts: int = 1,
        init: str = "randn",
        seed: int = 0,
        restart_mode: Literal["auto", "sequential", "vectorised"] = "auto",
        steps_per_call: int = 1,
        compile: bool = False,
    ) -> None:
        if lr_scheduler is not None:
            milestone_fractions = None
        super().__init__(
            optimizer,
            lr_scheduler,
            milestone_fractions=milestone_fractions,
            lr_gamma=lr_gamma,
            label_strategy=label_strategy,
            distance=distance if distance is not None else CosineDistance(),
            priors=[TotalVariation(weight=1e-4)] if priors is None else priors,
            signed_gradients=signed_gradients,
            boxed=boxed,
            restarts=restarts,
            init=init,
            seed=seed,
            restart_mode=restart_mode,
            steps_per_call=steps_per_call,
            compile=compile,
        )
        self._use_auto_labels(label_strategy)


class GradInversion(_AutoLabelsByDefault, ImagePriorAttack):
    """GradInversion-style recipe (Yin et al. 2021; group consistency not included).

    Same arguments as :class:`ImagePriorAttack`, with these defaults: Adam lr 0.1, no schedule,
    :class:`SquaredL2Distance`, ``priors=None`` meaning ``[BNStatisticsPrior(0.1, first_bn_multiplier=10),
    TotalVariation(1e-4), L2ImageNorm(1e-6)]``, unsigned, not boxed. The victim must have BatchNorm layers
    (their running statistics are the prior's targets).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        milestone_fractions: Optional[list[float]] = None,
        lr_gamma: float = 0.1,
        label_strategy: Optional[LabelStrategy] = None,
        distance: Optional[DistanceFn] = None,
        priors: Optional[list[nn.Module]] = None,
        signed_gradients: bool = False,
        boxed: bool = False,
        restarts: int = 1,
        init: str = "randn",
        seed: int = 0,
        restart_mode: Literal["auto", "sequential", "vectorised"] = "auto",
        steps_per_call: int = 1,
        compile: bool = False,
    ) -> None:
        if priors is None:
            priors = [BNStatisticsPrior(weight=0.1, first_bn_multiplier=10.0), TotalVariation(weight=1e-4), L2ImageNorm(weight=1e-6)]
        super().__init__(
            optimizer,
            lr_scheduler,
            milestone_fractions=milestone_fractions,
            lr_gamma=lr_gamma,
            label_strategy=label_strategy,
            distance=distance if distance is not None else SquaredL2Distance(),
            priors=priors,
            signed_gradients=signed_gradients,
            boxed=boxed,
            restarts=restarts,
            init=init,
            seed=seed,
            restart_mode=restart_mode,
            steps_per_call=steps_per_call,
            compile=compile,
        )
        self._use_auto_labels(label_strategy)


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
