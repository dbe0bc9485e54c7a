"""Defenses applied by the client to what it shares (a list of gradient / update tensors).

A defense is a callable ``list[Tensor] -> list[Tensor]`` with a typed constructor so configs can list
them in order::

    defenses:
      - class_path: lightning_gi.victim.defenses.TopKPruning
        init_args: {prune_ratio: 0.9}
      - class_path: lightning_gi.victim.defenses.GaussianNoise
        init_args: {std: 0.01, seed: 0}

They act on the *shared* tensors, after the client computed them (FedSGD gradient or FedAvg weight
difference). Per-example clipping + noise (DP-SGD) needs the per-example gradients and therefore lives
on the client side: :class:`lightning_gi.victim.dpsgd.DPSGDClient`.

Available: :class:`GaussianNoise`, :class:`LaplaceNoise` (absolute scale or relative to each tensor's
max |g|), :class:`GradientClipping` (global norm), :class:`TopKPruning` (per-tensor magnitude
pruning), :class:`LowPrecision` (fp16 / bf16 rounding, int8 per-tensor symmetric quantisation).
See docs/defenses.md for the statistics each one guarantees.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import math
from typing import Optional

import torch
from torch import Tensor

PRECISIONS = ("fp16", "bf16", "int8")


def _check_number(name: str, owner: str, value: float, low: float = 0.0, high: float = math.inf,
                  low_open: bool = False) -> float:
    """``value`` as a float in [low, high] (or (low, high] with ``low_open``), else a clear ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or v > high or v < low or (low_open and v == low):
        lo = "(" if low_open else "["
        raise ValueError(f"{owner}: {name} must be in {lo}{low}, {high}], got {value!r}")
    return v


class Defense(ABC):
    """Base class: transform the shared gradient list. Randomness comes from an explicit seed.

    ``seed=None`` draws from torch's global RNG; with a seed every call draws the same noise (use
    :meth:`apply` with your own generator to draw independent noise for several clients).
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = seed

    def _generator(self) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed)
        return g

    @abstractmethod
    def apply(self, gradients: list[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        """The defended copy of ``gradients``; draw any randomness from ``generator``."""

    def __call__(self, gradients: list[Tensor]) -> list[Tensor]:
        return self.apply([g.detach() for g in gradients], self._generator())

    def strength(self) -> float:
        """The defense's main knob (noise std, prune ratio, ...), for tables and plots."""
        return math.nan

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _noise_like(g: Tensor, kind: str, generator: Optional[torch.Generator]) -> Tensor:
    """Unit-scale noise of ``g``'s shape: N(0,1) or Laplace(0, b=1), drawn on CPU (reproducible)."""
    if kind == "gaussian":
        z = torch.randn(g.shape, generator=generator, dtype=torch.float64)
    else:  # inverse-CDF Laplace(0, 1): -sign(u) * log(1 - 2|u|), u ~ U(-1/2, 1/2)
        u = torch.rand(g.shape, generator=generator, dtype=torch.float64) - 0.5
        z = -torch.sign(u) * torch.log1p(-2.0 * u.abs().clamp_max(0.5 - 1e-16))
    return z.to(device=g.device, dtype=g.dtype)


class _AdditiveNoise(Defense):
    kind = "gaussian"
    knob = "std"

    def __init__(self, scale: float, relative: bool, seed: Optional[int]) -> None:
        super().__init__(seed)
        if not isinstance(relative, bool):
            raise ValueError(f"{type(self).__name__}: relative must be a bool, got {relative!r}")
        self.relative = relative
        setattr(self, self.knob, _check_number(self.knob, type(self).__name__, scale))

    def layer_scale(self, g: Tensor) -> float:
        """The noise scale used for tensor ``g`` (absolute, or times max |g| when ``relative``)."""
        scale = getattr(self, self.knob)
        if self.relative:
            return scale * float(g.detach().abs().max()) if g.numel() else 0.0
        return scale

    def apply(self, gradients: list[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        out = []
        for g in gradients:
            s = self.layer_scale(g)
            out.append(g + s * _noise_like(g, self.kind, generator) if s > 0 else g.clone())
        return out

    def strength(self) -> float:
        return float(getattr(self, self.knob))


class GaussianNoise(_AdditiveNoise):
    """Additive Gaussian noise N(0, std^2) on every shared entry (DLG's noise defense, Sec. 5).

    Args:
        std: the noise standard deviation (>= 0). With ``relative=True`` the std of tensor ``l`` is
            ``std * max|g_l|`` (a per-layer scale, as in the stepwise paper's noise experiment).
        relative: scale the noise per tensor by its largest magnitude.
        seed: noise seed (None: torch's global RNG).
    """

    kind = "gaussian"
    knob = "std"

    def __init__(self, std: float = 1e-2, seed: Optional[int] = None, relative: bool = False) -> None:
        if isinstance(std, (int, float)) and not isinstance(std, bool) and std < 0:
            raise ValueError(f"GaussianNoise std must be >= 0, got {std}")
        super().__init__(std, relative, seed)


class LaplaceNoise(_AdditiveNoise):
    """Additive Laplace noise with density exp(-|x|/b)/(2b) (std = sqrt(2) b) on every shared entry.

    Args:
        scale: the Laplace scale ``b`` (>= 0). With ``relative=True`` tensor ``l`` gets
            ``b_l = scale * max|g_l|`` (the stepwise paper's "0.1 x max per layer" setting is
            ``LaplaceNoise(scale=0.1, relative=True)``).
        relative: scale the noise per tensor by its largest magnitude.
        seed: noise seed (None: torch's global RNG).
    """

    kind = "laplace"
    knob = "scale"

    def __init__(self, scale: float = 1e-2, seed: Optional[int] = None, relative: bool = False) -> None:
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale < 0:
            raise ValueError(f"LaplaceNoise scale must be >= 0, got {scale}")
        super().__init__(scale, relative, seed)


class GradientClipping(Defense):
    """Global-norm clipping: scale all tensors by ``min(1, max_norm / ||g||)`` (norm over all tensors).

    Args:
        max_norm: the largest allowed global norm (> 0).
        norm_type: the p of the p-norm (2.0, or ``inf`` for the max norm).
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        super().__init__(None)
        self.max_norm = _check_number("max_norm", "GradientClipping", max_norm, low_open=True)
        self.norm_type = _check_number("norm_type", "GradientClipping", norm_type, low=1.0)

    def apply(self, gradients: list[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        norm = global_norm(gradients, self.norm_type)
        factor = min(1.0, self.max_norm / (norm + 1e-12)) if norm > 0 else 1.0
        return [g * factor for g in gradients]

    def strength(self) -> float:
        return self.max_norm


def global_norm(tensors: list[Tensor], norm_type: float = 2.0) -> float:
    """The p-norm of all entries of all tensors (float64)."""
    if not tensors:
        return 0.0
    if math.isinf(norm_type):
        return max(float(t.detach().abs().max()) if t.numel() else 0.0 for t in tensors)
    per = torch.stack([t.detach().double().norm(norm_type) for t in tensors])
    return float(per.norm(norm_type))


class TopKPruning(Defense):
    """Gradient pruning / sparsification: per tensor, zero all but the largest-magnitude entries.

    Tensor ``l`` with ``n`` entries keeps exactly ``k = n - round(prune_ratio * n)`` entries (ties broken
    by ``torch.topk``), so the fraction zeroed is ``prune_ratio`` up to rounding (DLG Sec. 5: 20% already
    stops DLG; the stepwise / GIAS papers attack 90-99% pruned gradients).

    Args:
        prune_ratio: the fraction of entries set to zero per tensor, in [0, 1].
        min_keep: keep at least this many entries per tensor (1 keeps every tensor informative; 0 lets
            ``prune_ratio=1`` zero everything).
    """

    def __init__(self, prune_ratio: float = 0.9, min_keep: int = 0) -> None:
        super().__init__(None)
        self.prune_ratio = _check_number("prune_ratio", "TopKPruning", prune_ratio, 0.0, 1.0)
        if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
            raise ValueError(f"TopKPruning: min_keep must be an int >= 0, got {min_keep!r}")
        self.min_keep = min_keep

    def keep_count(self, numel: int) -> int:
        keep = numel - int(round(self.prune_ratio * numel))
        return min(numel, max(keep, self.min_keep))

    def apply(self, gradients: list[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        out = []
        for g in gradients:
            n = g.numel()
            k = self.keep_count(n)
            if k >= n:
                out.append(g.clone())
                continue
            flat = g.reshape(-1)
            mask = torch.zeros(n, dtype=torch.bool, device=g.device)
            if k > 0:
                mask[torch.topk(flat.abs(), k, sorted=False).indices] = True
            out.append(torch.where(mask, flat, torch.zeros_like(flat)).reshape(g.shape))
        return out

    def strength(self) -> float:
        return self.prune_ratio


class LowPrecision(Defense):
    """Share the gradient in low precision (DLG Sec. 5 "half precision" / "int8"), returned dequantised.

    - ``"fp16"`` / ``"bf16"``: round-to-nearest into the format and back (relative error <= 2^-11 /
      2^-8 for normal numbers). Magnitudes beyond the format's range saturate to its largest finite
      value instead of becoming inf (an inf would make the observation unusable).
    - ``"int8"``: per-tensor symmetric quantisation: ``s = max|g| / 127``, ``q = round(g / s)`` in
      [-127, 127], shared ``q * s``; the error per entry is at most ``s / 2``.

    Args:
        precision: one of ``"fp16"``, ``"bf16"``, ``"int8"``.
    """

    def __init__(self, precision: str = "fp16") -> None:
        super().__init__(None)
        if precision not in PRECISIONS:
            raise ValueError(f"LowPrecision: precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision

    @staticmethod
    def int8_scale(g: Tensor) -> float:
        return float(g.detach().abs().max()) / 127.0 if g.numel() else 0.0

    def apply(self, gradients: list[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        out = []
        for g in gradients:
            if self.precision == "int8":
                s = self.int8_scale(g)
                if s == 0.0:
                    out.append(torch.zeros_like(g))
                    continue
                q = torch.round(g.double() / s).clamp(-127, 127)
                out.append((q * s).to(g.dtype))
            else:
                dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
                big = torch.finfo(dtype).max
                out.append(g.clamp(-big, big).to(dtype).to(g.dtype))
        return out

    def strength(self) -> float:
        return {"fp16": 16.0, "bf16": 16.0, "int8": 8.0}[self.precision]


__all__ = [
    "Defense",
    "GaussianNoise",
    "GradientClipping",
    "LaplaceNoise",
    "LowPrecision",
    "TopKPruning",
    "global_norm",
]
