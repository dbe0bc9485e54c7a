"""Image priors (regularisers on the dummy images).

Contract: a prior is an ``nn.Module`` with a float attribute ``weight`` and ``forward(x) -> scalar``
returning the UNWEIGHTED value; the attack adds ``prior.weight * prior(x)`` to its loss.  A schedule
callback may change ``weight`` during a run (e.g. switch a prior on late by raising it from 0).
``x`` is a batch of images ``[N, C, H, W]``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["TotalVariation", "L2ImageNorm", "BNStatisticsPrior"]


def _check_images(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected images of shape [N, C, H, W], got shape {tuple(x.shape)}")


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


class TotalVariation(nn.Module):
    """Total variation of the images.

    Anisotropic form (default, Inverting Gradients, Geiping et al. 2020)::

        reduce(|dx|^beta) + reduce(|dy|^beta)

    with ``dx = x[..., :, 1:] - x[..., :, :-1]`` (horizontal neighbours), ``dy = x[..., 1:, :] -
    x[..., :-1, :]`` (vertical neighbours) and ``reduce`` the mean (or sum) over all their entries.
    ``beta = 1`` is the L1 form of Inverting Gradients (``mean|dx| + mean|dy|``); ``beta = 2`` is the
    squared form.

    Isotropic form (``isotropic=True``), on the ``(H-1) x (W-1)`` grid where both differences exist::

        reduce((dx^2 + dy^2 + eps)^(beta/2) - eps^(beta/2))

    ``eps`` keeps the square root differentiable at flat regions; subtracting the constant
    ``eps^(beta/2)`` keeps a constant image at exactly 0 and does not change the gradient (values of
    non-flat pixels are lowered by at most ``eps^(beta/2)``, 1e-4 for the defaults).  (Ye et al. 2024 write beta = 2 in the paper; their code uses 1.)

    Args:
        weight: multiplier the attack applies (not used in ``forward``).
        isotropic: isotropic instead of anisotropic form.
        beta: exponent, > 0 (for the anisotropic form, beta < 1 has an infinite gradient at 0).
        reduction: ``"mean"`` or ``"sum"`` over the difference entries (and images, channels).
        eps: smoothing constant of the isotropic form.
    """

    def __init__(
        self,
        weight: float = 1e-4,
        isotropic: bool = False,
        beta: float = 1.0,
        reduction: str = "mean",
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        _check_reduction(reduction)
        self.weight = float(weight)
        self.isotropic = bool(isotropic)
        self.beta = float(beta)
        self.reduction = reduction
        self.eps = float(eps)

    def _reduce(self, t: Tensor) -> Tensor:
        return t.mean() if self.reduction == "mean" else t.sum()

    def forward(self, x: Tensor) -> Tensor:
        _check_images(x)
        if self.isotropic:
            dx = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
            dy = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
            half = self.beta / 2.0
            eps = torch.tensor(self.eps, dtype=x.dtype, device=x.device)
            value = (dx.pow(2) + dy.pow(2) + eps).pow(half) - eps.pow(half)
            return self._reduce(value)
        dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs()
        dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs()
        if self.beta != 1.0:
            dx, dy = dx.pow(self.beta), dy.pow(self.beta)
        return self._reduce(dx) + self._reduce(dy)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, isotropic={self.isotropic}, beta={self.beta}, reduction={self.reduction!r}"


class L2ImageNorm(nn.Module):
    """Squared L2 norm of the images.

    ``reduction="mean"`` (default): mean over images of ``||x_n||_2^2 / numel(x_n)``, i.e. the mean of
    ``x^2`` over all entries, so the value does not grow with the image size.  ``reduction="sum"``:
    mean over images of the plain squared norm ``||x_n||_2^2`` (``numel(x_n)`` times larger; choose the
    weight accordingly).

    Args:
        weight: multiplier the attack applies (not used in ``forward``).
        reduction: ``"mean"`` or ``"sum"`` over the entries of each image (always mean over images).
    """

    def __init__(self, weight: float = 1e-6, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.weight = float(weight)
        self.reduction = reduction

    def forward(self, x: Tensor) -> Tensor:
        _check_images(x)
        sq = x.pow(2).flatten(1)
        per_image = sq.mean(dim=1) if self.reduction == "mean" else sq.sum(dim=1)
        return per_image.mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reduction={self.reduction!r}"


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))


class BNStatisticsPrior(nn.Module):
    """BatchNorm statistics prior (DeepInversion / GradInversion, Yin et al. 2020/2021).

    ``attach(model)`` registers a forward hook on every ``BatchNorm2d`` (and ``SyncBatchNorm``) of the
    victim, in ``model.modules()`` order.  Each hook records the batch mean and the biased variance of
    the layer's *input* over ``(N, H, W)`` (kept in the autograd graph, so the prior backpropagates to
    the dummy images).  Because the hooks read the input rather than the module's batch statistics,
    this works with the victim in eval mode.  ``forward(x)`` must be called after the victim's forward
    on the dummy batch; it returns

        sum_l  c_l * ( ||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2 )

    from the most recent victim forward, with ``c_l = first_bn_multiplier`` for the first BN layer,
    ``second_bn_multiplier`` for the second and 1 for the others (Ye et al. 2024, authors' code: 1.3 and 3).
    ``x`` itself is not used (it is part of the prior contract).

    For multi-process use, :meth:`layer_statistics` is the single place the recorded statistics are
    read from; a distributed wrapper can override it to all-reduce them (:meth:`layer_counts` gives the
    number of values each local statistic was computed from, for exact pooled mean/variance).

    Args:
        weight: multiplier the attack applies (not used in ``forward``).
        first_bn_multiplier: factor on the first BN layer's term.
        second_bn_multiplier: factor on the second BN layer's term.
    """

    def __init__(self, weight: float = 0.1, first_bn_multiplier: float = 10.0, second_bn_multiplier: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.second_bn_multiplier = float(second_bn_multiplier)
        # plain lists: the victim's BN modules must not become submodules/parameters of the prior
        self._bn_layers: List[nn.Module] = []
        self._handles: list = []
        self._stats: List[Optional[Tuple[Tensor, Tensor]]] = []
        self._counts: List[int] = []

    # -- hooks -------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module) -> "BNStatisticsPrior":
        """Register the statistics hooks on every BN layer of ``model`` (re-attaching detaches first)."""
        self.detach()
        layers = [m for m in model.modules() if _is_batchnorm(m)]
        if not layers:
            raise ValueError(f"BNStatisticsPrior: model {type(model).__name__} has no BatchNorm2d layer")
        for idx, layer in enumerate(layers):
            if layer.running_mean is None or layer.running_var is None:
                raise ValueError(
                    f"BNStatisticsPrior: BN layer {idx} ({layer}) tracks no running statistics "
                    "(track_running_stats=False), so there is nothing to match"
                )
        self._bn_layers = layers
        self._stats = [None] * len(layers)
        self._counts = [0] * len(layers)
        self._handles = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(layers)]
        return self

    def detach(self) -> None:
        """Remove all hooks and forget the recorded statistics."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._bn_layers = []
        self._stats = []
        self._counts = []

    def clear(self) -> None:
        """Forget the recorded statistics (releases the graph of the last victim forward)."""
        self._stats = [None] * len(self._bn_layers)
        self._counts = [0] * len(self._bn_layers)

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0]
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            self._stats[index] = (mean, var)
            self._counts[index] = x.numel() // x.shape[1]

        return hook

    # -- statistics --------------------------------------------------------------------------------
    def layer_statistics(self) -> List[Tuple[Tensor, Tensor]]:
        """``[(batch_mean, biased_batch_var), ...]`` per BN layer from the most recent victim forward."""
        self._require_attached()
        missing = [i for i, s in enumerate(self._stats) if s is None]
        if missing:
            raise RuntimeError(
                "BNStatisticsPrior: no statistics recorded for BN layer(s) "
                f"{missing}; call the prior after the victim's forward pass on the dummy batch"
            )
        return list(self._stats)  # type: ignore[arg-type]

    def layer_counts(self) -> List[int]:
        """Number of values (N*H*W) behind each layer's recorded statistics."""
        self._require_attached()
        return list(self._counts)

    def _require_attached(self) -> None:
        if not self.attached:
            raise RuntimeError("BNStatisticsPrior is not attached to a model: call prior.attach(victim) first")

    # -- prior -------------------------------------------------------------------------------------
    def forward(self, x: Optional[Tensor] = None) -> Tensor:
        stats = self.layer_statistics()
        total = None
        for i, ((mean, var), layer) in enumerate(zip(stats, self._bn_layers)):
            rm = layer.running_mean.to(dtype=mean.dtype)
            rv = layer.running_var.to(dtype=var.dtype)
            term = torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv)
            if i == 0:
                term = self.first_bn_multiplier * term
            elif i == 1:
                term = self.second_bn_multiplier * term
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, first_bn_multiplier={self.first_bn_multiplier}, "
            f"second_bn_multiplier={self.second_bn_multiplier}, "
            f"attached_layers={len(self._bn_layers)}"
        )
