"""Vectorised restarts: R restarts of a small victim evaluated as ONE batched computation.

:meth:`GradientInversionAttack.evaluate` (the restart-aware core) evaluates R restarts one after the other (R victim
forwards, R ``autograd.grad`` calls, R graphs). For small victims (the sigmoid LeNet, CIFAR-size ResNets) and
many-restart recipes that is dominated by per-call overhead. Here the R restarts run together:

* the victim's parameters are expanded to R copies ``P[r]`` (stride-0 views, no memory per copy) and the
  forward is ``torch.func.vmap`` over restarts of ``torch.func.functional_call(victim, P[r], x[r])``: one
  grouped convolution / batched matmul per layer for all restarts;
* ``autograd.grad(sum_r L_r, P, create_graph=True)`` gives every restart's parameter gradient at once
  (``[R, ...]`` per tensor): ``L_r`` depends only on ``P[r]`` and ``x[r]``, so slice r is exactly restart r's
  gradient, and differentiating ``sum_r D_r`` with respect to ``x`` gives each restart its own gradient;
* the distances are vmapped over restarts too (a loop when a distance cannot be vmapped), priors loop.

This is an option of the core (``restart_mode: vectorised``, or ``auto``: on CUDA, and on a CPU for small victims,
see :func:`auto_vectorise`), not a subclass: the core calls
:func:`vectorised_objective` and :func:`vectorised_final_distances`. Same objective, same trajectories as the
sequential restarts (``tests/test_distributed.py`` checks losses and
iterates), same best-iterate/winner logic. Composes with batch sharding (``gi_shard``: the stacked gradients
are all-reduced by the same hook) and with restarts over ranks (each rank vectorises its own restarts).

Limits: the victim must be in eval mode (BatchNorm batch statistics cannot be taken per restart inside vmap)
and the BN-statistics prior is not supported (its forward hooks cannot see one restart at a time under vmap):
use the sequential :class:`ImagePriorAttack` for those. Memory grows with R like the sequential version's.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = [
    "VectorisedRestartsAttack", "VectorisedInvertingGradients", "restart_gradients", "vectorisable", "auto_vectorise",
    "vectorised_objective", "vectorised_final_distances",
]


def vectorisable(model: nn.Module, priors: Sequence[nn.Module]) -> Optional[str]:
    """None when R restarts of ``model`` with ``priors`` can be vmapped, else the reason they cannot."""
    from ..objectives.priors import BNStatisticsPrior

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        return "vectorised restarts need the victim in eval mode (BatchNorm in train mode found)"
    if any(isinstance(p, BNStatisticsPrior) for p in priors):
        return ("vectorised restarts do not support BNStatisticsPrior (its hooks cannot see one restart at a "
                "time under vmap): use restart_mode: sequential")
    return None


#: On a CPU, vmapped restarts pay off only for small victims: vmap turns each convolution into a grouped one, whose
#: backward is slow on CPU for wide layers, while a small victim's cost is per-call overhead that batching removes.
#: Measured (R = 8, 32x32, batch 1, one thread, ``benchmarks/restarts_throughput.py``), vectorised / sequential:
#: LeNet (16k parameters) 2.2-2.5x, ConvNet width 32 (175k) 1.1-1.4x, ConvNet width 64 (535k) 0.94-1.03x, ResNet-18
#: (11M) 0.29-0.32x: break-even near 500k parameters, the threshold sits below it.
CPU_VECTORISE_MAX_PARAMETERS = 250_000


def auto_vectorise(device: torch.device, restarts: int, model: nn.Module, priors: Sequence[nn.Module]) -> bool:
    """The automatic restart mode, for R > 1 when the victim and priors allow it: vectorised on CUDA; on a CPU only
    for victims of at most :data:`CPU_VECTORISE_MAX_PARAMETERS` parameters (sequential is faster for larger ones)."""
    if restarts <= 1 or vectorisable(model, priors) is not None:
        return False
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    return kind == "cpu" and sum(p.numel() for p in model.parameters()) <= CPU_VECTORISE_MAX_PARAMETERS


def restart_gradients(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    params: Optional[list[Tensor]] = None,
    reduction: str = "mean",
) -> list[Tensor]:
    """Per-restart client gradients of ``model`` for ``images [R, N, ...]`` and hard ``targets [N]``, as one
    batched computation; returns one ``[R, *param.shape]`` tensor per parameter, differentiable (create_graph)."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    params = [p for _, p in named] if params is None else params
    r = images.shape[0]
    stacked = [p.detach().unsqueeze(0).expand(r, *p.shape).requires_grad_(True) for p in params]

    def forward(ps: tuple[Tensor, ...], x: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, ps)), (x,))

    logits = vmap(forward)(tuple(stacked), images)  # [R, N, classes]
    per_sample = nn.functional.cross_entropy(logits.flatten(0, 1), targets.repeat(r), reduction="none")
    per_restart = per_sample.view(r, -1)
    loss = (per_restart.mean(dim=1) if reduction == "mean" else per_restart.sum(dim=1)).sum()
    return list(torch.autograd.grad(loss, stacked, create_graph=True))


def stacked_victim_gradients(attack: Any, images: Tensor, targets: Tensor) -> list[Tensor]:
    """``[R, ...]`` gradient per victim parameter for ``images [R, n, C, H, W]`` (reduced over shards)."""
    if not attack.threat_model.is_single_gradient:
        raise ValueError("vectorised restarts support one FedSGD gradient: use restart_mode: sequential for this observation")
    if targets.dim() != 1:
        raise ValueError("vectorised restarts need hard labels (not optimised soft labels): use restart_mode: sequential")
    if attack.batch_sharded and targets.shape[0] != images.shape[1]:
        targets = targets[attack.local_slice]
    reduction = "sum" if attack.batch_sharded else attack.loss_reduction
    grads = restart_gradients(attack.victim, images, targets, attack._victim_params, reduction)
    return attack.reduce_gradients(grads)


def restart_distances(attack: Any, grads: list[Tensor]) -> Tensor:
    """Matching distance of every restart, ``[R]`` (vmapped; a loop if the distance cannot be vmapped)."""
    match = attack.matching_distance
    state = attack._vmap_distance
    if state is not False:
        try:
            out = vmap(lambda *g: match(list(g)))(*grads)
            attack._vmap_distance = True
            return out
        except Exception:  # data-dependent Python control flow in a custom distance
            if state:
                raise
            attack._vmap_distance = False
    return torch.stack([match([g[r] for g in grads]) for r in range(grads[0].shape[0])])


def vectorised_objective(attack: Any, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(sum of the R restarts' losses, scoring distances [R], prior terms summed over restarts) as one batched
    computation: what :meth:`GradientInversionAttack.evaluate` runs when ``vectorised_restarts``."""
    grads = stacked_victim_gradients(attack, images, targets)
    distances = restart_distances(attack, grads)
    total = distances.sum()
    if attack.scheduled:  # score iterates unmasked, all tensors (base class docs)
        with torch.no_grad(), attack.unscheduled():
            distances = restart_distances(attack, [g.detach() for g in grads])
    terms_sum: dict[str, Tensor] = {}
    for r in range(images.shape[0]):
        for name, value in attack.prior_terms(images[r]).items():
            terms_sum[name] = value if name not in terms_sum else terms_sum[name] + value
    for value in terms_sum.values():
        total = total + value
    return total, distances, terms_sum


def vectorised_final_distances(attack: Any, images: Tensor, targets: Tensor) -> Tensor:
    """Scoring distances ``[R]`` of ``images`` (no schedules), for the final evaluation."""
    grads = stacked_victim_gradients(attack, images, targets)
    with attack.unscheduled():
        return restart_distances(attack, [g.detach() for g in grads]).detach()


def __getattr__(name: str) -> Any:
    # the named vectorised recipes live with the other recipes (inverting.py); imported lazily, no import cycle
    if name in ("VectorisedRestartsAttack", "VectorisedInvertingGradients"):
        from . import inverting

        return getattr(inverting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
