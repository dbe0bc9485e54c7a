"""What a client computes and shares: the ONE simulation used by the victim side and by every attack.

The victim side (:mod:`lightning_gi.victim`) runs it on the private batch to produce the observation; the
attacker rebuilds the same computation on its dummy batch from the observation's metadata
(:meth:`ThreatModel.from_metadata`), as breaching's single gradient-loss object does. So FedAvg, several
clients and secure aggregation are properties of the *observation*, not subclasses per attack: every attack
(DLG, iDLG, Inverting Gradients, GradInversion, the stepwise attack, GIAS) matches whatever update the
observation says was shared.

The pieces:

- :func:`cross_entropy`: the client's loss, hard labels (LongTensor) or soft labels (DLG's distributions);
- :func:`client_gradient`: FedSGD, the batch-mean gradient (McMahan et al. 2017, FedSGD);
- :func:`unrolled_update`: FedAvg's local SGD steps, ``w_E - w_0`` (McMahan et al. 2017, Algorithm 1),
  unrolled functionally so that the attacker can differentiate through it (``create_graph=True``);
- :class:`ThreatModel`: how the shared update was produced (FedSGD/FedAvg/DP-SGD, the local training, the
  split over clients, sum or mean); :meth:`ThreatModel.simulate` is the server's view of a batch;
- :class:`ClientUpdate` (:class:`FedSGDClient`, :class:`FedAvgClient`, and
  :class:`lightning_gi.victim.dpsgd.DPSGDClient`): the configurable client computation of the victim side;
- :func:`apply_defenses` with ONE seeding rule (:func:`client_seed`) and :func:`simulate_clients`: several
  clients, each computing its update and applying the defenses with its own noise, aggregated by the server;
- :func:`capture_observation`: one FedSGD client, as a :class:`~lightning_gi.observation.GradientObservation`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

if TYPE_CHECKING:  # pragma: no cover
    from .observation import GradientObservation
    from .victim.defenses import Defense

THREAT_MODELS = ("fedsgd", "fedavg", "dpsgd")
AGGREGATIONS = ("mean", "sum")
ThreatModelName = Literal["fedsgd", "fedavg", "dpsgd"]
Aggregation = Literal["mean", "sum"]

_CLIENT_SEED_STRIDE = 1_000_003
"""Client k's noise seed is ``seed + k * stride``: client 0 draws exactly what a lone client with ``seed`` draws."""


# --------------------------------------------------------------------------------------------------
# The loss and the update of one client
# --------------------------------------------------------------------------------------------------
def cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """The client's loss: hard labels (LongTensor [N]) or soft labels ([N, classes] distributions, DLG)."""
    if targets.dtype == torch.long:
        return nn.functional.cross_entropy(logits, targets, reduction=reduction)
    per_sample = -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def forward_keeping_buffers(model: nn.Module, images: Tensor) -> Tensor:
    """``model(images)``; in train mode, BatchNorm's running statistics are left untouched.

    A victim in train mode normalises with batch statistics, and every forward would also move its
    running statistics; an attack evaluates the victim thousands of times, so the updates go to
    throw-away copies of the buffers (``torch.func.functional_call``) instead of the victim.
    """
    if not model.training:
        return model(images)
    state: dict[str, Tensor] = dict(model.named_parameters())
    state.update({name: buf.clone() for name, buf in model.named_buffers()})
    return torch.func.functional_call(model, state, (images,))


def _state(model: nn.Module, params: Optional[Sequence[Tensor]], buffers: Optional[Mapping[str, Tensor]],
           detach: bool) -> tuple[list[str], list[Tensor], dict[str, Tensor]]:
    names = [n for n, _ in model.named_parameters()]
    ps = list(model.parameters()) if params is None else list(params)
    if len(ps) != len(names):
        raise ValueError(f"got {len(ps)} parameter tensors for a model with {len(names)} parameters")
    if detach:
        ps = [p.detach().requires_grad_(True) for p in ps]
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()} if buffers is None else dict(buffers)
    return names, ps, bufs


def client_gradient(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    params: Optional[Sequence[Tensor]] = None,
    buffers: Optional[Mapping[str, Tensor]] = None,
    create_graph: bool = False,
    reduction: str = "mean",
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """FedSGD: the gradient of the client's ``reduction`` cross-entropy, and the buffers after the forward.

    ``params`` default to ``model.parameters()``; the model's own buffers are never modified (BN running
    statistics in train mode update copies). With ``create_graph`` the gradient is differentiable in
    ``images``/``targets`` (what an attack matches); one tensor per parameter, in ``model.parameters()`` order.
    (With ``create_graph`` on the model's own parameters the returned buffers dict is empty: nothing was shared.)
    """
    if create_graph and buffers is None and (params is None or _are_parameters_of(params, model)):
        ps = list(model.parameters()) if params is None else list(params)
        return own_parameter_gradient(model, images, targets, ps, reduction), {}
    names, ps, bufs = _state(model, params, buffers, detach=not create_graph)
    with torch.enable_grad():
        logits = functional_call(model, (dict(zip(names, ps)), bufs), (images,))
        grads = torch.autograd.grad(cross_entropy(logits, targets, reduction), ps, create_graph=create_graph)
    return [g if create_graph else g.detach() for g in grads], bufs


def own_parameter_gradient(model: nn.Module, images: Tensor, targets: Tensor, params: Sequence[Tensor],
                           reduction: str = "mean") -> list[Tensor]:
    """The attacker's hot path of :func:`client_gradient` (``create_graph``, no given buffers): ``params`` must be
    ``model.parameters()`` themselves, in order, all requiring grad (the caller checked it once). The module is
    called directly (no functional_call re-binding per step); train-mode BN statistics go to throw-away copies."""
    with torch.enable_grad():
        loss = cross_entropy(forward_keeping_buffers(model, images), targets, reduction)
        return list(torch.autograd.grad(loss, params, create_graph=True))


def _are_parameters_of(params: Sequence[Tensor], model: nn.Module) -> bool:
    """``params`` are exactly ``model.parameters()``, in order, all requiring grad (one pass, no list)."""
    count = 0
    for own in model.parameters():
        if count >= len(params) or own is not params[count] or not own.requires_grad:
            return False
        count += 1
    return count == len(params)


def local_step_indices(step: int, num_data: int, local_batch_size: Optional[int]) -> Tensor:
    """Which of the client's ``num_data`` examples local step ``step`` uses.

    ``local_batch_size=None`` (or >= num_data): all of them every step (full-batch local GD). Otherwise
    the data are cycled in order: step s uses examples ``(s*b + j) mod num_data`` for j < b.
    """
    if local_batch_size is None or local_batch_size >= num_data:
        return torch.arange(num_data)
    return (torch.arange(local_batch_size) + step * local_batch_size) % num_data


def unrolled_update(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    local_steps: int,
    local_lr: float,
    local_batch_size: Optional[int] = None,
    params: Optional[Sequence[Tensor]] = None,
    buffers: Optional[Mapping[str, Tensor]] = None,
    create_graph: bool = False,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """FedAvg's local training, unrolled functionally: ``(w_E - w_0 per parameter, buffers after)``.

    Each local step is one SGD step (no momentum, no weight decay) on the mean cross-entropy of the step's
    examples (:func:`local_step_indices`). The model itself is never modified. With ``create_graph=True``
    the result is differentiable with respect to ``images``/``targets`` (the attacker's simulation).
    """
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    names, start, bufs = _state(model, params, buffers, detach=False)
    current = start if create_graph else [p.detach().requires_grad_(True) for p in start]
    n = images.shape[0]
    with torch.enable_grad():
        for step in range(local_steps):
            idx = local_step_indices(step, n, local_batch_size).to(images.device)
            logits = functional_call(model, (dict(zip(names, current)), bufs), (images[idx],))
            grads = torch.autograd.grad(cross_entropy(logits, targets[idx]), current, create_graph=create_graph)
            if create_graph:
                current = [p - local_lr * g for p, g in zip(current, grads)]
            else:
                current = [(p - local_lr * g).detach().requires_grad_(True) for p, g in zip(current, grads)]
        update = [c - s for c, s in zip(current, start)]
    if not create_graph:
        update = [u.detach() for u in update]
    return update, bufs


# --------------------------------------------------------------------------------------------------
# The threat model: what the server sees of a batch
# --------------------------------------------------------------------------------------------------
@dataclass
class ThreatModel:
    """How a shared update was produced: everything the attacker needs to simulate it on a dummy batch.

    Written into an observation's metadata by the victim side (:meth:`to_metadata`) and read back by every
    attack (:meth:`from_metadata`); absent keys mean one FedSGD client (a plain captured gradient).
    """

    threat_model: ThreatModelName = "fedsgd"
    local_steps: int = 1
    local_lr: float = 1.0
    local_batch_size: Optional[int] = None  # None: all client data each local step
    client_batch_sizes: Optional[list[int]] = None  # None: one client holding the whole batch
    aggregation: Aggregation = "mean"

    def __post_init__(self) -> None:
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(f"threat_model must be one of {THREAT_MODELS}, got {self.threat_model!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.threat_model == "fedavg":
            if int(self.local_steps) < 1:
                raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
            if not float(self.local_lr) > 0:
                raise ValueError(f"local_lr must be > 0, got {self.local_lr}")
        if self.local_batch_size is not None and int(self.local_batch_size) < 1:
            raise ValueError(f"local_batch_size must be >= 1 or None, got {self.local_batch_size}")
        if self.client_batch_sizes is not None and (
            len(self.client_batch_sizes) == 0 or min(self.client_batch_sizes) < 1
        ):
            raise ValueError(f"client_batch_sizes must be positive, got {self.client_batch_sizes}")

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], batch_size: int) -> "ThreatModel":
        """Read what :meth:`to_metadata` wrote; absent keys mean one FedSGD client."""
        sizes = metadata.get("client_batch_sizes")
        client_sizes = [int(s) for s in str(sizes).split(",")] if sizes not in (None, "") else None
        lbs = int(metadata.get("local_batch_size", 0) or 0)
        spec = cls(
            threat_model=str(metadata.get("threat_model", "fedsgd")),  # type: ignore[arg-type]
            local_steps=int(metadata.get("local_steps", 1)),
            local_lr=float(metadata.get("local_lr", 1.0)),
            local_batch_size=lbs if lbs > 0 else None,
            client_batch_sizes=client_sizes,
            aggregation=str(metadata.get("aggregation", "mean")),  # type: ignore[arg-type]
        )
        if client_sizes is not None and sum(client_sizes) != batch_size:
            raise ValueError(
                f"metadata client_batch_sizes {client_sizes} sum to {sum(client_sizes)} but the observation's "
                f"batch_size is {batch_size}"
            )
        return spec

    def to_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"threat_model": self.threat_model, "aggregation": self.aggregation}
        if self.threat_model == "fedavg":
            meta.update(
                local_steps=int(self.local_steps),
                local_lr=float(self.local_lr),
                local_batch_size=int(self.local_batch_size or 0),
            )
        if self.client_batch_sizes is not None:
            meta["num_clients"] = len(self.client_batch_sizes)
            meta["client_batch_sizes"] = ",".join(str(int(s)) for s in self.client_batch_sizes)
        return meta

    def sizes(self, batch_size: int) -> list[int]:
        """The clients' batch sizes (one client holding the whole batch when unknown)."""
        return list(self.client_batch_sizes) if self.client_batch_sizes else [batch_size]

    @property
    def is_single_gradient(self) -> bool:
        """One FedSGD (or DP-SGD, matched as FedSGD) gradient of the whole batch: no local steps, one client."""
        return self.threat_model != "fedavg" and (self.client_batch_sizes is None or len(self.client_batch_sizes) == 1)

    @property
    def pseudo_gradient_scale(self) -> float:
        """What turns the shared tensors into a gradient-scale quantity: ``-1 / (local_lr * local_steps)`` for
        FedAvg, else 1. ``w_E - w_0 = -lr * sum_s g_s``, the sum of the E local steps' batch-mean gradients; every
        example enters the same number of steps, so to first order ``sum_s g_s = E * G`` with G the FedSGD gradient
        of the client's batch. Divided by ``-lr * E`` the update is G (exactly G for one step): label-count rules
        (which read N * dL/db), distances and optimiser tolerances keep their FedSGD scale."""
        if self.threat_model != "fedavg":
            return 1.0
        return -1.0 / (float(self.local_lr) * int(self.local_steps))

    def simulate(
        self,
        model: nn.Module,
        images: Tensor,
        targets: Tensor,
        params: Optional[Sequence[Tensor]] = None,
        create_graph: bool = False,
    ) -> list[Tensor]:
        """What the server sees for ``(images, targets)`` split over the clients (no defenses): the sum or mean
        over clients of each client's FedSGD gradient or FedAvg weight difference, in ``model.parameters()``
        order. The attacker calls it with ``create_graph=True`` on its dummy batch."""
        sizes = self.sizes(images.shape[0])
        if sum(sizes) != images.shape[0]:
            raise ValueError(f"client batch sizes {sizes} do not sum to the batch size {images.shape[0]}")
        total: Optional[list[Tensor]] = None
        start = 0
        for size in sizes:
            x, y = images[start:start + size], targets[start:start + size]
            start += size
            if self.threat_model == "fedavg":
                upd, _ = unrolled_update(
                    model, x, y, self.local_steps, self.local_lr, self.local_batch_size, params=params,
                    create_graph=create_graph,
                )
            else:
                upd, _ = client_gradient(model, x, y, params=params, create_graph=create_graph)
            total = upd if total is None else [a + b for a, b in zip(total, upd)]
        assert total is not None
        if self.aggregation == "mean" and len(sizes) > 1:
            total = [t / len(sizes) for t in total]
        return total


UpdateSpec = ThreatModel
"""The former name of :class:`ThreatModel` (kept for scripts written against earlier releases)."""


def simulate_shared_update(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    spec: ThreatModel,
    params: Optional[Sequence[Tensor]] = None,
    create_graph: bool = False,
) -> list[Tensor]:
    """``spec.simulate(...)`` (function form)."""
    return spec.simulate(model, images, targets, params=params, create_graph=create_graph)


# --------------------------------------------------------------------------------------------------
# The victim side's configurable client computation, defenses and aggregation
# --------------------------------------------------------------------------------------------------
def client_seed(seed: Optional[int], client_index: int) -> Optional[int]:
    """THE seeding rule of every random part of a client (defense noise, DP-SGD noise): client k draws from
    ``seed + k * 1_000_003``, so client 0 draws what a lone client with ``seed`` draws and clients draw
    independent noise. None: torch's global RNG."""
    return None if seed is None else int(seed) + _CLIENT_SEED_STRIDE * int(client_index)


def client_generator(seed: Optional[int], client_index: int = 0) -> Optional[torch.Generator]:
    """A CPU generator seeded by :func:`client_seed` (None when ``seed`` is None)."""
    s = client_seed(seed, client_index)
    return None if s is None else torch.Generator().manual_seed(s)


def apply_defenses(defenses: Sequence["Defense"], shared: Sequence[Tensor], client_index: int = 0) -> list[Tensor]:
    """Apply ``defenses`` in order to a client's shared tensors; each defense draws from its own seed under
    :func:`client_seed` (independent noise per defense and per client, reproducible)."""
    out = [g.detach() for g in shared]
    for defense in defenses:
        out = list(defense.apply(out, client_generator(defense.seed, client_index)))
    return out


class ClientUpdate(ABC):
    """What one client computes from its private batch before defenses. Subclasses implement
    :meth:`compute`; :meth:`metadata` records what the attacker must know to simulate it."""

    threat_model = "fedsgd"

    @abstractmethod
    def compute(
        self, model: nn.Module, images: Tensor, labels: Tensor, client_index: int = 0
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """(shared tensors aligned with ``model.parameters()``, buffers after the client's computation)."""

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor, client_index: int = 0) -> list[Tensor]:
        return self.compute(model, images, labels, client_index)[0]

    def metadata(self) -> dict[str, Any]:
        return {"threat_model": self.threat_model}


class FedSGDClient(ClientUpdate):
    """FedSGD: the client shares the mean cross-entropy gradient of its batch (one step, not applied)."""

    threat_model = "fedsgd"

    def compute(self, model, images, labels, client_index=0):  # type: ignore[override]
        return client_gradient(model, images, labels.long())


class FedAvgClient(ClientUpdate):
    """FedAvg local training: ``local_steps`` SGD steps at ``local_lr``; shares ``w_E - w_0``.

    Args:
        local_steps: number of local SGD steps E (>= 1). The peer framework calls it num_local_updates.
        local_lr: the client's learning rate (> 0).
        local_batch_size: examples per local step (num_data_per_local_update_step); None: the whole
            client batch every step. Step s uses examples (s*b + j) mod B, j < b.
    """

    threat_model = "fedavg"

    def __init__(self, local_steps: int = 5, local_lr: float = 1e-2, local_batch_size: Optional[int] = None) -> None:
        if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
            raise ValueError(f"FedAvgClient: local_steps must be an int >= 1, got {local_steps!r}")
        if isinstance(local_lr, bool) or not isinstance(local_lr, (int, float)) or not local_lr > 0:
            raise ValueError(f"FedAvgClient: local_lr must be > 0, got {local_lr!r}")
        if local_batch_size is not None and (
            isinstance(local_batch_size, bool) or not isinstance(local_batch_size, int) or local_batch_size < 1
        ):
            raise ValueError(f"FedAvgClient: local_batch_size must be an int >= 1 or None, got {local_batch_size!r}")
        self.local_steps = local_steps
        self.local_lr = float(local_lr)
        self.local_batch_size = local_batch_size

    def compute(self, model, images, labels, client_index=0):  # type: ignore[override]
        return unrolled_update(model, images, labels.long(), self.local_steps, self.local_lr, self.local_batch_size)

    def metadata(self) -> dict[str, Any]:
        return {
            "threat_model": "fedavg",
            "local_steps": self.local_steps,
            "local_lr": self.local_lr,
            "local_batch_size": int(self.local_batch_size or 0),
        }


@dataclass
class SharedUpdate:
    """What the server receives from a round: the aggregate of the clients' defended updates and, when the
    clients share them, their buffers after the update (BN running statistics), averaged over clients."""

    tensors: list[Tensor]
    buffers: Optional[dict[str, Tensor]]


def simulate_clients(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    client: Optional[ClientUpdate] = None,
    num_clients: int = 1,
    defenses: Sequence["Defense"] = (),
    aggregation: str = "mean",
) -> SharedUpdate:
    """The victim side of a round: ``inputs`` (already in the model's input space) are split into
    ``num_clients`` equal consecutive parts; client k computes ``client`` (default FedSGD) on its part,
    applies ``defenses`` (:func:`apply_defenses`, client index k), and the server takes the ``aggregation``."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if num_clients < 1 or inputs.shape[0] % num_clients:
        raise ValueError(f"{inputs.shape[0]} examples cannot be split evenly over num_clients={num_clients}")
    client = client if client is not None else FedSGDClient()
    per_client = inputs.shape[0] // num_clients
    total: Optional[list[Tensor]] = None
    buffers: Optional[dict[str, Tensor]] = None
    for k in range(num_clients):
        sl = slice(k * per_client, (k + 1) * per_client)
        shared, bufs = client.compute(model, inputs[sl], labels[sl].long(), client_index=k)
        shared = apply_defenses(defenses, shared, client_index=k)
        total = shared if total is None else [a + b for a, b in zip(total, shared)]
        if bufs:
            buffers = (
                {n: b.detach().clone().double() for n, b in bufs.items()}
                if buffers is None
                else {n: buffers[n] + b.double() for n, b in bufs.items()}
            )
    assert total is not None
    if aggregation == "mean" and num_clients > 1:
        total = [t / num_clients for t in total]
    if buffers is not None:
        dtypes = {n: b.dtype for n, b in model.named_buffers()}
        buffers = {n: (b / num_clients).to(dtypes[n]) for n, b in buffers.items()}
    return SharedUpdate(total, buffers)


def client_gradients(model: nn.Module, images: Tensor, labels: Tensor, reduction: str = "mean") -> list[Tensor]:
    """The FedSGD client computation: gradient of the cross-entropy of ``(images, labels)`` (model untouched).

    Returns one tensor per ``model.parameters()`` entry (parameters with requires_grad=False included)."""
    return client_gradient(model, images, labels.long(), reduction=reduction)[0]


def capture_observation(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    defenses: Sequence["Defense"] = (),
    share_labels: bool = False,
    metadata: Optional[Mapping[str, Any]] = None,
) -> "GradientObservation":
    """Simulate a FedSGD client: mean cross-entropy gradient of a private batch, defenses applied in order.

    ``images`` must already be in the model's input space (normalised as the client would).
    """
    from .observation import GradientObservation, ObservationError

    if images.ndim != 4:
        raise ObservationError(f"images must be [N,C,H,W], got shape {tuple(images.shape)}")
    if labels.ndim != 1 or labels.numel() != images.shape[0]:
        raise ObservationError(
            f"labels must be [N] with N={images.shape[0]} matching the images, got shape {tuple(labels.shape)}"
        )
    update = simulate_clients(model, images, labels, defenses=defenses)
    return GradientObservation(
        gradients=update.tensors,
        batch_size=int(images.shape[0]),
        labels=labels.detach().cpu().long() if share_labels else None,
        param_names=[n for n, _ in model.named_parameters()],
        metadata=dict(metadata or {}),
    )


__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "ClientUpdate",
    "FedAvgClient",
    "FedSGDClient",
    "SharedUpdate",
    "THREAT_MODELS",
    "ThreatModel",
    "ThreatModelName",
    "UpdateSpec",
    "apply_defenses",
    "capture_observation",
    "client_generator",
    "client_gradient",
    "client_gradients",
    "client_seed",
    "cross_entropy",
    "forward_keeping_buffers",
    "local_step_indices",
    "simulate_clients",
    "simulate_shared_update",
    "unrolled_update",
]
