"""Update rules: what the optimiser is fed instead of the raw gradient of the image unknowns.

Pluggable into every image-space attack (:class:`~lightning_gi.attacks.image_prior.ImagePriorAttack` and its
recipes, :class:`~lightning_gi.attacks.stepwise.StepwiseInversion`) through ``update_rule``; the projection to
the valid image box is the separate ``boxed`` switch. The rule sees each unknown's gradient as stacked by the
attack core, ``[R, N, C, H, W]`` (one slice per restart), and the optimiser step index.

- :class:`RawGradient`: the gradient itself.
- :class:`SignedGradient`: its sign (Inverting Gradients, Geiping et al. 2020, Sec. 4: "Adam on the signed
  gradient"; the stepwise paper's Eq. 12 also writes sign(g)).
- :class:`QuantisedSign`: the stepwise authors' code (Ye et al. 2024, MiLab-HITSZ/2023YeHFGradInv): a sign with a
  coarse magnitude, ``0.8 clamp(round(2 g / median|g|) / 2, -1, 1) + 0.2 sign(g)``, the median per restart.

Every rule can scale its output by ``warmup_factor`` during the first ``warmup_steps`` steps (the authors double
the quantised sign for the first 100 iterations).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def quantized_sign(grad: Tensor, per_first_dim: bool = False) -> Tensor:
    """The stepwise authors' gradient transform: a sign with a coarse magnitude.

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


class UpdateRule(ABC):
    """Maps an unknown's gradient to the direction the optimiser is fed.

    Args:
        warmup_steps: during the first this many optimiser steps the output is multiplied by ``warmup_factor``.
        warmup_factor: the factor (> 0).
    """

    def __init__(self, warmup_steps: int = 0, warmup_factor: float = 1.0) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{type(self).__name__}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not float(warmup_factor) > 0:
            raise ValueError(f"{type(self).__name__}: warmup_factor must be > 0, got {warmup_factor!r}")
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)

    @abstractmethod
    def direction(self, grad: Tensor) -> Tensor:
        """The direction for ``grad`` (``[R, N, ...]`` stacked over restarts, or one restart's tensor)."""

    def __call__(self, grad: Tensor, step: int) -> Tensor:
        out = self.direction(grad)
        if step < self.warmup_steps and self.warmup_factor != 1.0:
            out = out * self.warmup_factor
        return out

    def apply_(self, grad: Tensor, step: int) -> None:
        """Replace ``grad`` in place by the rule's output (what the attack calls before each optimiser step)."""
        grad.copy_(self(grad, step))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(warmup_steps={self.warmup_steps}, warmup_factor={self.warmup_factor})"


class RawGradient(UpdateRule):
    """The gradient itself (plain first-order optimisation)."""

    def direction(self, grad: Tensor) -> Tensor:
        return grad


class SignedGradient(UpdateRule):
    """``sign(g)`` (Inverting Gradients, Sec. 4)."""

    def direction(self, grad: Tensor) -> Tensor:
        return torch.sign(grad)

    def apply_(self, grad: Tensor, step: int) -> None:
        grad.sign_()  # in place: no allocation per step (ms-scale steps of small victims)
        if step < self.warmup_steps and self.warmup_factor != 1.0:
            grad.mul_(self.warmup_factor)


class QuantisedSign(UpdateRule):
    """The stepwise authors' quantised sign (:func:`quantized_sign`, the median per restart for stacked restarts).

    Args:
        per_restart: take the median over each restart's slice ``grad[r]`` (the attack core stacks restarts in
            the first dimension); False: over the whole tensor.
        warmup_steps, warmup_factor: see :class:`UpdateRule` (the authors: 100 steps, x2).
    """

    def __init__(self, per_restart: bool = True, warmup_steps: int = 0, warmup_factor: float = 1.0) -> None:
        super().__init__(warmup_steps, warmup_factor)
        self.per_restart = bool(per_restart)

    def direction(self, grad: Tensor) -> Tensor:
        return quantized_sign(grad, per_first_dim=self.per_restart and grad.dim() > 1)


__all__ = ["QuantisedSign", "RawGradient", "SignedGradient", "UpdateRule", "quantized_sign"]
