"""DP-SGD on the client (Abadi et al. 2016): per-example clipping + Gaussian noise, then the batch mean.

Per-example gradients need the client's data, so this is a client computation
(:class:`DPSGDClient`, a :class:`~lightning_gi.victim.threat_models.ClientUpdate`), not a defense
on the shared gradient. The shared tensor is::

    g = (sum_i clip_C(g_i) + N(0, (sigma * C)^2 I)) / B

with ``clip_C(g) = g * min(1, C / ||g||_2)`` (norm over all parameters of one example), clip norm
``C`` and noise multiplier ``sigma``. Per-example gradients are computed with
``torch.func.vmap(torch.func.grad(...))`` over ``functional_call`` (BatchNorm must be in eval mode:
per-example gradients are undefined with batch statistics).

The privacy guarantee (epsilon at a given delta) comes from opacus's RDP accountant when opacus is
installed (``pip install opacus``); :meth:`DPSGDClient.epsilon` returns None otherwise.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..client import ClientUpdate, client_generator


def _has_train_mode_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def per_example_gradients(model: nn.Module, images: Tensor, labels: Tensor) -> list[Tensor]:
    """Per-example cross-entropy gradients, one tensor ``[N, *param.shape]`` per ``model.parameters()``."""
    if _has_train_mode_batchnorm(model):
        raise ValueError(
            "per-example gradients (DP-SGD) need BatchNorm in eval mode; the victim has BatchNorm in train mode "
            "(set train_mode: false, or use a model without BatchNorm)"
        )
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(ps: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (ps, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    with torch.enable_grad():
        per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, images, labels.long())
    return [per[n].detach() for n in names]


def clip_per_example(per_example: list[Tensor], clip_norm: float) -> tuple[list[Tensor], Tensor]:
    """Scale each example's gradient (all tensors together) to L2 norm <= ``clip_norm``.

    Returns (clipped per-example tensors, the per-example norms before clipping [N])."""
    n = per_example[0].shape[0]
    norms = torch.stack([t.reshape(n, -1).double().pow(2).sum(1) for t in per_example]).sum(0).sqrt()
    factor = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
    clipped = [t * factor.to(t.dtype).view(n, *([1] * (t.ndim - 1))) for t in per_example]
    return clipped, norms


def dp_sgd_gradient(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    clip_norm: float,
    noise_multiplier: float,
    generator: Optional[torch.Generator] = None,
) -> list[Tensor]:
    """One DP-SGD step's shared gradient: mean of clipped per-example gradients + N(0, (sigma C / B)^2)."""
    clipped, _ = clip_per_example(per_example_gradients(model, images, labels), clip_norm)
    b = images.shape[0]
    out = []
    for t in clipped:
        s = t.sum(0)
        if noise_multiplier > 0:
            z = torch.randn(s.shape, generator=generator, dtype=torch.float64).to(device=s.device, dtype=s.dtype)
            s = s + noise_multiplier * clip_norm * z
        out.append(s / b)
    return out


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> Optional[float]:
    """Epsilon of ``steps`` subsampled-Gaussian steps by opacus's RDP accountant; None without opacus."""
    if noise_multiplier <= 0:
        return math.inf
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        return None
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(accountant.get_epsilon(delta=float(delta)))


class DPSGDClient(ClientUpdate):
    """A client that trains with DP-SGD and shares one noisy clipped mean gradient (FedSGD-style).

    Args:
        clip_norm: per-example L2 clip norm C (> 0).
        noise_multiplier: sigma (>= 0): the noise std on the clipped sum is sigma * C.
        seed: noise seed (client k draws from :func:`lightning_gi.client.client_seed`); None: torch's global RNG.
        sample_rate: the client's sampling probability per step, for the accountant only (0, 1].
        accounting_steps: steps the accountant composes (1: this one shared gradient).
        delta: the delta at which epsilon is reported.
    """

    threat_model = "dpsgd"

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        seed: Optional[int] = None,
        sample_rate: float = 1.0,
        accounting_steps: int = 1,
        delta: float = 1e-5,
    ) -> None:
        for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier), ("sample_rate", sample_rate), ("delta", delta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
                raise ValueError(f"DPSGDClient: {name} must be a number, got {value!r}")
        if not clip_norm > 0:
            raise ValueError(f"DPSGDClient: clip_norm must be > 0, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"DPSGDClient: noise_multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"DPSGDClient: sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"DPSGDClient: delta must be in (0, 1), got {delta}")
        if isinstance(accounting_steps, bool) or not isinstance(accounting_steps, int) or accounting_steps < 1:
            raise ValueError(f"DPSGDClient: accounting_steps must be an int >= 1, got {accounting_steps!r}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.seed = seed
        self.sample_rate = float(sample_rate)
        self.accounting_steps = accounting_steps
        self.delta = float(delta)

    def epsilon(self) -> Optional[float]:
        """(epsilon, delta)-DP guarantee via opacus's RDP accountant (None when opacus is not installed)."""
        return rdp_epsilon(self.noise_multiplier, self.sample_rate, self.accounting_steps, self.delta)

    def compute(self, model, images, labels, client_index=0):  # type: ignore[override]
        gen = client_generator(self.seed, client_index)  # the clients' one seeding rule
        grads = dp_sgd_gradient(model, images, labels, self.clip_norm, self.noise_multiplier, gen)
        return grads, {n: b.detach().clone() for n, b in model.named_buffers()}

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "threat_model": "dpsgd",
            "dp_clip_norm": self.clip_norm,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_delta": self.delta,
            "dp_sample_rate": self.sample_rate,
            "dp_accounting_steps": self.accounting_steps,
        }
        eps = self.epsilon()
        meta["dp_epsilon"] = float(eps) if eps is not None else "unavailable (pip install opacus)"
        return meta


__all__ = ["DPSGDClient", "clip_per_example", "dp_sgd_gradient", "per_example_gradients", "rdp_epsilon"]
