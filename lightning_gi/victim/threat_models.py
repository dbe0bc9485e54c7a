"""Threat models beyond one FedSGD gradient: what the client computes and shares, and what the server sees.

The pieces, each small and configurable:

- a :class:`ClientUpdate` is the client's computation on its private data:
  :class:`FedSGDClient` (the batch-mean gradient), :class:`FedAvgClient` (E local SGD steps, shares the
  weight difference ``w_E - w_0``), :class:`lightning_gi.victim.dpsgd.DPSGDClient` (per-example clipping
  + Gaussian noise);
- :class:`ThreatModelVictim` is the DataModule: several clients (``num_clients``), each with its own
  private batch, computes its update, applies the defenses (independent noise per client), and the
  server observes their ``sum`` or ``mean``. It also decides what else is shared: labels, the number of
  data points, the BN buffers after the update. The model state is the base class's (``model_seed``:
  untrained, re-drawn per seed; ``weights_path``: a checkpoint) and so is ``train_mode``.

The observation records all hyperparameters an attacker needs in ``metadata`` (str/int/float/bool),
which :class:`lightning_gi.attacks.fedavg.UnrolledUpdateMixin` reads to simulate the same update on its
dummy batch (``threat_model``, ``local_steps``, ``local_lr``, ``local_batch_size``, ``num_clients``,
``client_batch_sizes``, ``aggregation``, ...). It records nothing that rebuilds the private batch: no
dataset indices, no ``batch_seed``, no defense noise seed (the batch is in the ``GroundTruth`` only, which
attacks never see). See docs/threat_models.md.

:func:`unrolled_update` is the single implementation of FedAvg's local training used by both sides:
the client (``create_graph=False``) and the attacker (``create_graph=True``, differentiable in the
dummy images, through ``torch.func.functional_call``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..observation import GradientObservation
from .datamodule import GroundTruth, Normalization, VictimDataModule, is_bundled, normalization_metadata
from .defenses import Defense, apply_defenses

THREAT_MODELS = ("fedsgd", "fedavg", "dpsgd")
AGGREGATIONS = ("mean", "sum")


# --------------------------------------------------------------------------------------------------
# The client computation (shared by client simulation and attacker)
# --------------------------------------------------------------------------------------------------
def _cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Hard-label (LongTensor) or soft-label ([N, classes] distribution) cross-entropy."""
    if targets.dtype == torch.long:
        return nn.functional.cross_entropy(logits, targets, reduction=reduction)
    per_sample = -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


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
    """FedAvg's local training, unrolled functionally: returns ``(w_E - w_0 per parameter, buffers after)``.

    Each local step is one SGD step (no momentum, no weight decay) on the mean cross-entropy of the
    step's examples (:func:`local_step_indices`). ``params`` default to ``model.parameters()`` (they
    must require grad when ``create_graph``); ``buffers`` default to copies of the model's buffers, so the
    model itself is never modified (BN running statistics in train mode update the copies).
    With ``create_graph=True`` the result is differentiable with respect to ``images`` / ``targets``.
    """
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    names = [n for n, _ in model.named_parameters()]
    start = list(model.parameters()) if params is None else list(params)
    if len(start) != len(names):
        raise ValueError(f"got {len(start)} parameter tensors for a model with {len(names)} parameters")
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()} if buffers is None else dict(buffers)
    if create_graph:
        current = start
    else:
        current = [p.detach().requires_grad_(True) for p in start]
    n = images.shape[0]
    with torch.enable_grad():
        for step in range(local_steps):
            idx = local_step_indices(step, n, local_batch_size).to(images.device)
            logits = functional_call(model, ({k: v for k, v in zip(names, current)}, bufs), (images[idx],))
            loss = _cross_entropy(logits, targets[idx])
            grads = torch.autograd.grad(loss, current, create_graph=create_graph)
            if create_graph:
                current = [p - local_lr * g for p, g in zip(current, grads)]
            else:
                current = [(p - local_lr * g).detach().requires_grad_(True) for p, g in zip(current, grads)]
        update = [c - s for c, s in zip(current, start)]
    if not create_graph:
        update = [u.detach() for u in update]
    return update, bufs


def functional_gradient(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    params: Optional[Sequence[Tensor]] = None,
    buffers: Optional[Mapping[str, Tensor]] = None,
    create_graph: bool = False,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """The FedSGD client's batch-mean gradient, computed without touching the model's buffers."""
    names = [n for n, _ in model.named_parameters()]
    ps = list(model.parameters()) if params is None else list(params)
    if not create_graph:
        ps = [p.detach().requires_grad_(True) for p in ps]
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()} if buffers is None else dict(buffers)
    with torch.enable_grad():
        logits = functional_call(model, ({k: v for k, v in zip(names, ps)}, bufs), (images,))
        grads = torch.autograd.grad(_cross_entropy(logits, targets), ps, create_graph=create_graph)
    return [g if create_graph else g.detach() for g in grads], bufs


@dataclass
class UpdateSpec:
    """How a shared update was produced: what the attacker needs to simulate it on a dummy batch."""

    threat_model: str = "fedsgd"
    local_steps: int = 1
    local_lr: float = 1.0
    local_batch_size: Optional[int] = None  # None: all client data each local step
    client_batch_sizes: Optional[list[int]] = None  # None: one client holding the whole batch
    aggregation: str = "mean"

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
    def from_metadata(cls, metadata: Mapping[str, Any], batch_size: int) -> "UpdateSpec":
        """Read the spec that :class:`ThreatModelVictim` writes; absent keys mean one FedSGD client."""
        sizes = metadata.get("client_batch_sizes")
        client_sizes = [int(s) for s in str(sizes).split(",")] if sizes not in (None, "") else None
        lbs = int(metadata.get("local_batch_size", 0) or 0)
        spec = cls(
            threat_model=str(metadata.get("threat_model", "fedsgd")),
            local_steps=int(metadata.get("local_steps", 1)),
            local_lr=float(metadata.get("local_lr", 1.0)),
            local_batch_size=lbs if lbs > 0 else None,
            client_batch_sizes=client_sizes,
            aggregation=str(metadata.get("aggregation", "mean")),
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
        return list(self.client_batch_sizes) if self.client_batch_sizes else [batch_size]


def simulate_shared_update(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    spec: UpdateSpec,
    params: Optional[Sequence[Tensor]] = None,
    create_graph: bool = False,
) -> list[Tensor]:
    """What the server sees for a batch split over clients per ``spec`` (no defenses): the sum / mean over
    clients of each client's FedSGD gradient or FedAvg weight difference. Used by the attacker
    (``create_graph=True``) and by tests."""
    sizes = spec.sizes(images.shape[0])
    if sum(sizes) != images.shape[0]:
        raise ValueError(f"client batch sizes {sizes} do not sum to the batch size {images.shape[0]}")
    total: Optional[list[Tensor]] = None
    start = 0
    for size in sizes:
        x, y = images[start:start + size], targets[start:start + size]
        start += size
        if spec.threat_model == "fedavg":
            upd, _ = unrolled_update(
                model, x, y, spec.local_steps, spec.local_lr, spec.local_batch_size, params=params, create_graph=create_graph
            )
        else:
            upd, _ = functional_gradient(model, x, y, params=params, create_graph=create_graph)
        total = upd if total is None else [a + b for a, b in zip(total, upd)]
    assert total is not None
    if spec.aggregation == "mean" and len(sizes) > 1:
        total = [t / len(sizes) for t in total]
    return total


# --------------------------------------------------------------------------------------------------
# Client computations (configurable objects)
# --------------------------------------------------------------------------------------------------
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
        return functional_gradient(model, images, labels.long())


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


def public_repr(obj: Any) -> str:
    """``Name(arg=value, ...)`` of a defense without its random seed (or private attributes): what the server
    may know about a client's defense; the seed would let it regenerate and subtract the noise."""
    args = ", ".join(
        f"{k}={v!r}" for k, v in vars(obj).items() if not k.startswith("_") and "seed" not in k.lower()
    )
    return f"{type(obj).__name__}({args})"


# --------------------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------------------
class ThreatModelVictim(VictimDataModule):
    """Simulated clients under a configurable threat model; the server observes their aggregate update.

    The private data are ``num_clients * batch_size`` images picked like :class:`FedSGDVictim` (one
    :func:`select_batch` call, so ``label_mode="unique"`` needs that many classes); client k holds images
    ``[k*batch_size, (k+1)*batch_size)``. Each client computes ``client`` (default FedSGD), applies the
    ``defenses`` with its own noise stream, and the server sees the ``aggregation`` (sum/mean) of the
    clients' shared tensors. The attacker reconstructs all ``num_clients * batch_size`` images.

    Args:
        client: the client computation (:class:`FedSGDClient`, :class:`FedAvgClient`, ``DPSGDClient``).
        num_clients: clients aggregated into one observed update (>= 1).
        aggregation: ``"mean"`` (FedAvg server average) or ``"sum"`` (secure-aggregation sum).
        share_labels: the clients' labels are part of the observation (all clients, in client order).
        share_num_data_points: the observation's batch_size is the true number of data points; when
            False it is ``assumed_batch_size`` (the attacker's guess) and ``client_batch_sizes`` are omitted.
        assumed_batch_size: the attacker's guess when the count is not shared (default: the true count).
        share_buffers: the clients also share their buffers after the update (BN running statistics),
            averaged over clients; available as :attr:`shared_buffers` (the observation file format has no
            slot for them) and saved next to ``save_observation`` as ``<path>.buffers.pt``.
        defenses: applied in order by every client to its shared tensors.
        Other arguments as :class:`FedSGDVictim` / :class:`VictimDataModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        client: Optional[ClientUpdate] = None,
        num_clients: int = 1,
        aggregation: str = "mean",
        dataset: str = "photographs",
        data_root: Optional[str] = None,
        batch_size: int = 1,
        batch_seed: int = 0,
        label_mode: str = "unique",
        num_distinct: Optional[int] = None,
        share_labels: bool = False,
        share_num_data_points: bool = True,
        assumed_batch_size: Optional[int] = None,
        share_buffers: bool = False,
        defenses: Optional[list[Defense]] = None,
        save_observation: Optional[str] = None,
        weights_path: Optional[str] = None,
        model_seed: Optional[int] = None,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        num_classes: Optional[int] = None,
        train_mode: bool = False,
        normalization: Optional[Normalization] = None,
    ) -> None:
        super().__init__(model, weights_path, model_seed, image_shape, mean, std, num_classes, train_mode, normalization)
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if assumed_batch_size is not None and assumed_batch_size < 1:
            raise ValueError(f"assumed_batch_size must be >= 1, got {assumed_batch_size}")
        self.client = client if client is not None else FedSGDClient()
        self.num_clients = num_clients
        self.aggregation = aggregation
        self.dataset_name = dataset
        self.data_root = data_root
        self.batch_size = batch_size
        self.batch_seed = batch_seed
        self.label_mode = label_mode
        self.num_distinct = num_distinct
        self.share_labels = share_labels
        self.share_num_data_points = share_num_data_points
        self.assumed_batch_size = assumed_batch_size
        self.share_buffers = share_buffers
        self.defenses = list(defenses or [])
        self.save_observation = save_observation
        self.model_state = (
            f"checkpoint:{weights_path}" if weights_path else (f"seed:{model_seed}" if model_seed is not None else "as given")
        )
        self.shared_buffers: Optional[dict[str, Tensor]] = None
        self._given: Optional[tuple[Tensor, Tensor]] = None

    @classmethod
    def from_tensors(cls, model: nn.Module, images: Tensor, labels: Tensor, **kwargs: Any) -> "ThreatModelVictim":
        """Python use (tests, notebooks, benchmarks): the private data given as tensors ([N,C,H,W] in [0,1],
        [N]); ``batch_size`` per client defaults to N / num_clients."""
        if images.ndim != 4 or labels.ndim != 1 or labels.numel() != images.shape[0]:
            raise ValueError(f"need images [N,C,H,W] and labels [N], got {tuple(images.shape)}, {tuple(labels.shape)}")
        k = int(kwargs.get("num_clients", 1))
        if images.shape[0] % k:
            raise ValueError(f"{images.shape[0]} images cannot be split evenly over num_clients={k}")
        kwargs.setdefault("batch_size", images.shape[0] // k)
        if kwargs["batch_size"] * k != images.shape[0]:
            raise ValueError(f"batch_size * num_clients must equal the {images.shape[0]} images given")
        kwargs.setdefault("image_shape", tuple(images.shape[1:]))
        if all(kwargs.get(k) is None for k in ("mean", "std", "normalization")):
            kwargs["normalization"] = "none"  # tensors given in Python are fed as they are (as TensorBatchVictim)
        dm = cls(model, **kwargs)
        dm._given = (images.detach().float(), labels.detach().long())
        return dm

    def private_data(self) -> tuple[Tensor, Tensor]:
        """The clients' private images (in [0,1]) and labels, in client order. Never part of the observation:
        neither they nor what rebuilds them (dataset indices, ``batch_seed``) go into its metadata."""
        if self._given is not None:
            return self._given[0], self._given[1]
        from .data import build_dataset, select_batch

        c, h, w = self.image_shape
        if h != w:
            raise ValueError(f"bundled/torchvision datasets give square images; image_shape is {self.image_shape}")
        dataset = build_dataset(self.dataset_name, root=self.data_root, image_size=h, channels=c)
        images, labels, _ = select_batch(
            dataset,
            self.batch_size * self.num_clients,
            seed=self.batch_seed,
            label_mode=self.label_mode,
            num_distinct=self.num_distinct,
            # a victim with fewer outputs than a bundled dataset has classes: its first num_classes classes
            num_classes=self.num_classes if is_bundled(self.dataset_name) else None,
        )
        return images, labels

    def build_observation(self) -> tuple[GradientObservation, Optional[GroundTruth]]:
        images, labels = self.private_data()
        if int(labels.max()) >= self.num_classes or int(labels.min()) < 0:
            raise ValueError(f"labels {labels.tolist()} outside [0, {self.num_classes}) of the victim")
        inputs = (images - self.mean) / self.std
        total: Optional[list[Tensor]] = None
        buffers: Optional[dict[str, Tensor]] = None
        for k in range(self.num_clients):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            shared, bufs = self.client.compute(self.model, inputs[sl], labels[sl], client_index=k)
            gen = None
            seeds = [d.seed for d in self.defenses if d.seed is not None]
            if seeds and self.num_clients > 1:  # independent, reproducible noise per client
                gen = torch.Generator().manual_seed(int(seeds[0]) * 1000003 + k)
            shared = apply_defenses(self.defenses, shared, gen)
            total = shared if total is None else [a + b for a, b in zip(total, shared)]
            if bufs:
                buffers = (
                    {n: b.detach().clone().double() for n, b in bufs.items()}
                    if buffers is None
                    else {n: buffers[n] + b.double() for n, b in bufs.items()}
                )
        assert total is not None
        if self.aggregation == "mean" and self.num_clients > 1:
            total = [t / self.num_clients for t in total]
        if self.share_buffers and buffers is not None:
            self.shared_buffers = {
                n: (b / self.num_clients).to(dict(self.model.named_buffers())[n].dtype) for n, b in buffers.items()
            }
        n_true = images.shape[0]
        metadata: dict[str, Any] = dict(self.client.metadata())
        metadata.update(
            aggregation=self.aggregation,
            num_clients=self.num_clients,
            num_data_points_shared=self.share_num_data_points,
            buffers_shared=bool(self.share_buffers),
            labels_shared=bool(self.share_labels),
            train_mode=bool(self.model.training),
            model_state=self.model_state,
            dataset=self.dataset_name if self._given is None else "tensors",
            defenses=";".join(public_repr(d) for d in self.defenses),
            **normalization_metadata(self.mean, self.std),
        )
        # Only what the attacker legitimately knows: threat-model hyperparameters, the client split, the
        # dataset's name. Never the batch's dataset indices or batch_seed (they rebuild the private batch),
        # nor a defense's noise seed (it rebuilds the noise, which could then be subtracted).
        if self.share_num_data_points:
            metadata["client_batch_sizes"] = ",".join([str(self.batch_size)] * self.num_clients)
            batch_size = n_true
        else:
            batch_size = self.assumed_batch_size or n_true
        obs = GradientObservation(
            gradients=total,
            batch_size=int(batch_size),
            labels=labels.clone() if self.share_labels and batch_size == n_true else None,
            param_names=[n for n, _ in self.model.named_parameters()],
            metadata=metadata,
        )
        if self.save_observation:
            obs.save(self.save_observation)
            if self.shared_buffers is not None:
                from ..observation import save_atomic

                save_atomic(self.shared_buffers, f"{self.save_observation}.buffers.pt")
        return obs, GroundTruth(images.clone(), labels.clone())


__all__ = [
    "AGGREGATIONS",
    "ClientUpdate",
    "FedAvgClient",
    "FedSGDClient",
    "THREAT_MODELS",
    "ThreatModelVictim",
    "UpdateSpec",
    "functional_gradient",
    "local_step_indices",
    "public_repr",
    "simulate_shared_update",
    "unrolled_update",
]
