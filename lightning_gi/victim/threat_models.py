"""The multi-client victim DataModule: several simulated clients, the server's aggregate as the observation.

The client computation itself (FedSGD gradient, FedAvg local steps, defenses with one seeding rule,
aggregation over clients) is :mod:`lightning_gi.client`, the ONE simulation shared by this DataModule and by
every attack; this module keeps :class:`ThreatModelVictim`, which picks the private data, runs that simulation
and decides what else is shared (labels, the number of data points, the BN buffers after the update).

The observation records all hyperparameters an attacker needs in ``metadata`` (str/int/float/bool), which
every attack reads back (:meth:`lightning_gi.client.ThreatModel.from_metadata`) to simulate the same update
on its dummy batch (``threat_model``, ``local_steps``, ``local_lr``, ``local_batch_size``, ``num_clients``,
``client_batch_sizes``, ``aggregation``, ...). It records nothing that rebuilds the private batch: no
dataset indices, no ``batch_seed``, no defense noise seed (the batch is in the ``GroundTruth`` only, which
attacks never see). See docs/threat_models.md. The names of :mod:`lightning_gi.client` stay importable
from here.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor, nn

from ..client import (
    AGGREGATIONS,
    THREAT_MODELS,
    Aggregation,
    ClientUpdate,
    FedAvgClient,
    FedSGDClient,
    ThreatModel,
    UpdateSpec,
    client_gradient,
    local_step_indices,
    simulate_clients,
    simulate_shared_update,
    unrolled_update,
)
from ..observation import GradientObservation
from .datamodule import GroundTruth, Normalization, VictimDataModule, is_bundled, normalization_metadata
from .defenses import Defense


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
            averaged over clients; they travel in the observation's ``buffers`` (file format version 2) and
            are also available as :attr:`shared_buffers`.
        defenses: applied in order by every client to its shared tensors.
        Other arguments as :class:`FedSGDVictim` / :class:`VictimDataModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        client: Optional[ClientUpdate] = None,
        num_clients: int = 1,
        aggregation: Aggregation = "mean",
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
        update = simulate_clients(
            self.model, inputs, labels, self.client, self.num_clients, self.defenses, self.aggregation
        )
        self.shared_buffers = update.buffers if self.share_buffers else None
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
            gradients=update.tensors,
            batch_size=int(batch_size),
            labels=labels.clone() if self.share_labels and batch_size == n_true else None,
            param_names=[n for n, _ in self.model.named_parameters()],
            metadata=metadata,
            buffers=self.shared_buffers,
        )
        if self.save_observation:
            obs.save(self.save_observation)
        return obs, GroundTruth(images.clone(), labels.clone())


__all__ = [
    "AGGREGATIONS",
    "ThreatModel",
    "client_gradient",
    "ClientUpdate",
    "FedAvgClient",
    "FedSGDClient",
    "THREAT_MODELS",
    "ThreatModelVictim",
    "UpdateSpec",
    "local_step_indices",
    "public_repr",
    "simulate_shared_update",
    "unrolled_update",
]
