"""A generic image-space attack: gradient distance + image priors, pluggable update rules, boxed updates, restarts.

Inverting Gradients (Geiping et al. 2020), WDLG (Wang et al. 2023) and the GradInversion-style recipe
(Yin et al. 2021) are all one optimisation with different parts::

    minimise over x_r (r = 1..R restarts)   sum_r [ D(grad_W L(f(x_r), y), g_obs) + sum_k w_k P_k(x_r) ]

with labels ``y`` recovered from the observation first (:mod:`lightning_gi.labels`), ``D`` a gradient
distance (:mod:`lightning_gi.objectives.distances`) and ``P_k`` image priors with weights ``w_k``
(:mod:`lightning_gi.objectives.priors`). :class:`ImagePriorAttack` implements it once; the named
attacks (:class:`~lightning_gi.attacks.InvertingGradients`, :class:`~lightning_gi.attacks.GradInversion`,
:class:`~lightning_gi.attacks.WDLG`) are thin subclasses that only change defaults.

Update rules (paper options, all off by default)
------------------------------------------------
* ``update_rule`` (:mod:`lightning_gi.attacks.update_rules`): before every optimiser step each unknown's ``.grad``
  is replaced by the rule's direction: ``SignedGradient`` (Inverting Gradients, Sec. 4: "Adam on the signed
  gradient"), ``QuantisedSign`` (the stepwise authors' code), ``RawGradient`` (default). Done in
  ``on_before_optimizer_step``, which Lightning calls after ``backward`` (and for L-BFGS after every closure
  evaluation). The rules act per restart slice, so restarts cannot interact through them.
* ``boxed``: after every optimiser step the dummies are clamped per channel to the victim's valid input
  range ``[(0 - mean_c) / std_c, (1 - mean_c) / std_c]`` (images in [0, 1] before normalisation).
* ``milestone_fractions``: MultiStepLR with milestones ``round(f * trainer.max_steps)`` and ``lr_gamma``
  (Inverting Gradients: 3/8, 5/8, 7/8 and 0.1). Or pass any ``lr_scheduler`` factory instead.

Restarts (design)
-----------------
The ``R = restarts`` initialisations are stacked in one parameter ``dummy_images`` of shape
``[R, N, C, H, W]`` and optimised together in one run of the budget (``trainer.max_steps``). The
objective is the SUM of the R per-restart objectives; each restart's victim gradient, distance and priors
are computed from that restart's images alone (separate forward/``autograd.grad`` per restart, so BatchNorm
statistics, the BN prior and the batch-mean loss never mix restarts). Because ``d(sum_r L_r)/dx_r =
dL_r/dx_r`` and Adam, the sign and the box are element-wise, each restart follows exactly the trajectory it
would follow alone (``tests/test_inverting.py`` checks this against ``restarts=1`` runs). The learning-rate
schedule is shared, which is the same schedule each would have had alone.

* Seeds: restart r's images are the r-th draw from ``torch.Generator().manual_seed(seed)``, so restart 0
  equals the single-restart run with the same seed and the whole run is reproducible from ``seed``.
* Best iterate: tracked per restart on device (``restart_best_loss[R]``, ``restart_best_images[R, N, ...]``),
  by the scoring distance (not the priors; every tensor, no schedule weights or dropout masks), as in the base
  class; ``best_loss`` / ``best_images`` keep the
  base class's meaning (the leading restart's kept iterate) for callbacks.
* Winner: the restart whose kept iterate has the lowest matching distance (Geiping et al.: "the restart
  with the lowest matching loss"); :meth:`reconstruction` returns it, with all restarts' losses
  (and their images when R > 1).
* Cost: R victim double-backward passes per step, and R graphs alive until ``backward`` (memory grows with
  R). Where memory does not allow that, run ``restarts: 1`` with several ``seed`` values instead.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..labels import AutoLabels, IDLGLabels, LabelStrategy
from ..objectives.distances import CosineDistance, GradientDistance
from .base import RESTART_MODES, GradientInversionAttack, RestartMode
from .update_rules import RawGradient, UpdateRule
from .vectorised import auto_vectorise, vectorisable  # noqa: F401,E402 (re-exported)

# ``Callable[..., Any]``, not ``Callable[..., Tensor]``: with a class as return type jsonargparse reads a
# ``class_path`` as "a subclass of Tensor"; with ``Any`` it accepts a distance class (``class_path:
# lightning_gi.objectives.CosineDistance`` + typed ``init_args``) or a function's import path.
DistanceFn = GradientDistance  # configs may name a distance class only, not any callable

__all__ = ["ImagePriorAttack", "DistanceFn", "milestones_from_fractions", "box_bounds", "INVERTING_GRADIENTS_MILESTONES"]

INVERTING_GRADIENTS_MILESTONES = (3 / 8, 5 / 8, 7 / 8)


def _default_adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.1)


def milestones_from_fractions(fractions: Sequence[float], total_steps: int) -> list[int]:
    """``[round(f * total_steps) for f in fractions]`` (Inverting Gradients: 3/8, 5/8, 7/8 of the run)."""
    if total_steps is None or total_steps < 1:
        raise ValueError(
            f"milestone_fractions need a positive trainer.max_steps (the run's length), got {total_steps!r}"
        )
    out = []
    for f in fractions:
        if not 0.0 < float(f) < 1.0:
            raise ValueError(f"milestone fractions must lie in (0, 1), got {f}")
        out.append(max(1, int(round(float(f) * total_steps))))
    if out != sorted(out):
        raise ValueError(f"milestone fractions must be increasing, got {list(fractions)}")
    return out


def box_bounds(mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(low, high)`` of the victim's input space for images in [0, 1]: ``((0-m)/s, (1-m)/s)``."""
    return (0.0 - mean) / std, (1.0 - mean) / std


class ImagePriorAttack(GradientInversionAttack):
    """Optimise dummy images (labels recovered first) under a gradient distance plus image priors.

    Named recipes (:class:`~lightning_gi.attacks.InvertingGradients`, :class:`~lightning_gi.attacks.GradInversion`,
    :class:`~lightning_gi.attacks.WDLG`) are this class with other defaults: their :attr:`recipe` fills the
    arguments left at None; an explicit value always wins.

    Args:
        optimizer: optimiser factory over the dummy images (default Adam, lr 0.1).
        lr_scheduler: optional scheduler factory (stepped every optimiser step); exclusive with
            ``milestone_fractions``.
        milestone_fractions: MultiStepLR milestones as fractions of ``trainer.max_steps`` (e.g.
            ``[0.375, 0.625, 0.875]``); None: the recipe's (none here); ``[]``: no built-in schedule.
        lr_gamma: MultiStepLR decay factor at each milestone.
        label_strategy: label recovery rule; None: the recipe's (here :class:`~lightning_gi.labels.IDLGLabels`:
            iDLG for one image, the negative-row rule of GradInversion for a batch of distinct labels).
        distance: gradient distance ``f(dummy_grads, target_grads, weights, masks)``; None: the recipe's (here
            :class:`~lightning_gi.objectives.CosineDistance`).
        priors: image priors (modules with a ``weight``), applied to each restart's images; None: the recipe's
            (none here); ``[]``: no prior.
        update_rule: what the optimiser is fed instead of each unknown's gradient
            (:mod:`lightning_gi.attacks.update_rules`: ``SignedGradient``, ``QuantisedSign``, ``RawGradient``); None:
            the recipe's (here the raw gradient).
        boxed: clamp the dummies to the valid image range (per channel, input space) after each step; None: the
            recipe's (off here).
        restarts: number R of independent initialisations optimised side by side (see module docs).
        init: initialisation of every restart (see :class:`GradientInversionAttack`).
        seed: seed of the initialisations.
        restart_mode: how R > 1 restarts are evaluated: "sequential" (one victim double-backward per
            restart), "vectorised" (one vmapped computation, :mod:`lightning_gi.attacks.vectorised`; victim in
            eval mode, no BN-statistics prior) or "auto" (default): vectorised when eligible on CUDA, and on a CPU
            for victims of at most 250k parameters (LeNet 2.2x); sequential for larger ones on a CPU, where vmap's
            grouped-convolution backward made vectorised restarts 0.32x of sequential on ResNet-18
            (docs/performance_notes.md). Same objective and trajectories (to float round-off) either way.
        steps_per_call, compile: see :class:`GradientInversionAttack`.
    """

    #: defaults of the arguments given as None. Keys: ``milestone_fractions`` (list), ``distance`` and ``priors``
    #: (factories: a fresh object per attack), ``update_rule`` (a factory), ``boxed`` (bool), ``auto_labels`` (True:
    #: :class:`~lightning_gi.labels.AutoLabels` at the victim's geometry instead of the iDLG rule).
    recipe: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        milestone_fractions: Optional[list[float]] = None,
        lr_gamma: float = 0.1,
        label_strategy: Optional[LabelStrategy] = None,
        distance: Optional[DistanceFn] = None,
        priors: Optional[list[nn.Module]] = None,
        update_rule: Optional[UpdateRule] = None,
        boxed: Optional[bool] = None,
        restarts: int = 1,
        init: str = "randn",
        seed: int = 0,
        restart_mode: RestartMode = "auto",
        steps_per_call: int = 1,
        compile: bool = False,
    ) -> None:
        recipe = self.recipe
        auto_labels = label_strategy is None and bool(recipe.get("auto_labels", False))
        if distance is None:
            distance = recipe.get("distance", CosineDistance)()
        super().__init__(
            optimizer,
            lr_scheduler,
            label_strategy=label_strategy if label_strategy is not None or auto_labels else IDLGLabels(),
            init=init,
            seed=seed,
            distance=distance,
            steps_per_call=steps_per_call,
            compile=compile,
        )
        self._auto_labels = auto_labels
        if milestone_fractions is None and lr_scheduler is None:
            milestone_fractions = recipe.get("milestone_fractions")
        if milestone_fractions is not None and len(milestone_fractions) == 0:
            milestone_fractions = None  # [] : explicitly no built-in schedule
        if update_rule is None:
            update_rule = recipe["update_rule"]() if "update_rule" in recipe else RawGradient()
        if not isinstance(update_rule, UpdateRule):
            raise TypeError(f"update_rule must be an UpdateRule (lightning_gi.attacks.update_rules), got {update_rule!r}")
        if boxed is None:
            boxed = bool(recipe.get("boxed", False))
        if priors is None:
            priors = recipe["priors"]() if "priors" in recipe else []
        if restart_mode not in RESTART_MODES:
            raise ValueError(f"restart_mode must be one of {RESTART_MODES}, got {restart_mode!r}")
        self.restart_mode = restart_mode
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        if milestone_fractions is not None and lr_scheduler is not None:
            raise ValueError("give either lr_scheduler or milestone_fractions, not both")
        if milestone_fractions is not None:
            milestones_from_fractions(milestone_fractions, 1_000_000)  # validate early
        if not lr_gamma > 0:
            raise ValueError(f"lr_gamma must be positive, got {lr_gamma}")
        self.milestone_fractions = None if milestone_fractions is None else [float(f) for f in milestone_fractions]
        self.lr_gamma = float(lr_gamma)
        self.update_rule = update_rule
        self.boxed = bool(boxed)
        self.restarts = int(restarts)
        for prior in priors:
            if not isinstance(prior, nn.Module) or not hasattr(prior, "weight"):
                raise TypeError(f"a prior must be an nn.Module with a 'weight' attribute, got {prior!r}")
            self.priors.append(prior)

    def recover_labels(self) -> Optional[Tensor]:
        """With ``auto_labels`` in the recipe and no ``label_strategy`` given: :class:`~lightning_gi.labels.AutoLabels`
        at the victim's input geometry (iLRG counts when the last layer has a bias, exact with duplicated labels;
        else the evolutionary search of Ye et al.; else the iDLG rule)."""
        if self._auto_labels:
            _, size, _ = self.inputs.image_shape
            self.label_strategy = AutoLabels(
                image_size=size, mean=self.inputs.mean.flatten().tolist(), std=self.inputs.std.flatten().tolist()
            )
            self._auto_labels = False
        return super().recover_labels()

    # ------------------------------------------------------------------ restarts (the core keeps [R, N, ...])
    stack_restarts = True

    def bind(self, inputs: Any, device: Optional[torch.device] = None) -> "ImagePriorAttack":
        super().bind(inputs, device=device)
        dev = self.dummy_images.device
        low, high = box_bounds(self.inputs.mean.to(dev), self.inputs.std.to(dev))
        self.register_buffer("box_low", low, persistent=False)
        self.register_buffer("box_high", high, persistent=False)
        return self

    # ------------------------------------------------------------------ update rules
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Feed the optimiser :attr:`update_rule` of each unknown's gradient (nothing to do for the raw gradient)."""
        rule = self.update_rule
        if isinstance(rule, RawGradient) and rule.warmup_steps == 0:
            return
        step = int(self.trainer.global_step) if self._trainer is not None else 0
        for p in self._unknowns:
            if p.grad is not None:
                rule.apply_(p.grad, step)

    def after_optimizer_step(self) -> None:
        if self.boxed:
            self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Clamp every restart's dummies to the valid image range (per channel, in input space)."""
        self.dummy_images.clamp_(self.box_low, self.box_high)

    def configure_optimizers(self) -> Any:
        if self.milestone_fractions is None:
            return super().configure_optimizers()
        optimizer = self.optimizer_factory(self._unknowns)
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        milestones = milestones_from_fractions(self.milestone_fractions, max_steps)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=self.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
