"""The victim DataModule: the model the server knows, and the update it observed.

ONE class, :class:`Victim`, whose constructor states the model (weights or seed), the input geometry, the
normalisation (once: ``mean``/``std`` or ``normalization``), a ``source`` of data
(:mod:`lightning_gi.victim.sources`) and the threat model:

- a :class:`~lightning_gi.victim.sources.BatchSource` (:class:`DatasetImages`: bundled photographs/digits,
  torchvision datasets, ImageFolder; :class:`TensorImages`: tensors from Python) gives the clients' private
  batch; the victim runs the ONE client simulation (:func:`lightning_gi.client.simulate_clients`: FedSGD,
  FedAvg, DP-SGD, defenses, aggregation) on it, and records the threat model in the observation's metadata;
- an :class:`~lightning_gi.victim.sources.ObservationFile` gives an update captured elsewhere
  (docs/observation_format.md); the threat-model arguments do not apply to it.

The attack sees :meth:`Victim.attack_inputs` (model + observation + input geometry), never the ground truth
(:meth:`Victim.ground_truth`), which only metric/monitor callbacks read. Observation metadata (also written to
observation files) never holds what rebuilds the private batch (dataset indices, ``batch_seed``) nor a
defense's noise seed.

The former DataModules (``FedSGDVictim``, ``TensorBatchVictim``, ``ObservationFileVictim`` here and
``ThreatModelVictim`` in :mod:`lightning_gi.victim.threat_models`) are compatibility names: each maps its
old arguments to a source and builds a :class:`Victim`. ``VictimDataModule`` is :class:`Victim` (the CLI's
``data:`` base class).
"""
from __future__ import annotations

from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ..client import AGGREGATIONS, Aggregation, ClientUpdate, FedSGDClient, simulate_clients
from ..observation import AttackInputs, GradientObservation, GroundTruth  # re-exported: they sit next to the observation
from .data import LabelMode, is_bundled
from .defenses import Defense
from .models import classifier_head, load_weights, reinitialise
from .sources import BatchSource, DatasetImages, ObservationFile, TensorImages, VictimSource


class _Steps(IterableDataset):
    """An endless stream of step indices: the Trainer's max_steps ends the attack, not the data."""

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1


Normalization = Literal["mean_std", "none"]
NORMALIZATIONS = ("mean_std", "none")

_NORMALIZATION_FIX = (
    "give data.init_args.mean and data.init_args.std (the per-channel values the client subtracts and divides "
    "its [0, 1] images by, e.g. mean [0.485, 0.456, 0.406] and std [0.229, 0.224, 0.225] for torchvision "
    "ImageNet models) or state data.init_args.normalization: none when the client feeds [0, 1] images unchanged"
)


def is_demo_victim(model: nn.Module) -> bool:
    """The project's own demo victims (models defined in lightning_gi: ``LeNet``, ``ConvNet``, the
    integration examples' ``AuditCNN``) take [0, 1] images unnormalised; any other model is a user model."""
    return type(model).__module__.split(".")[0] == "lightning_gi"


def resolve_normalization(
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    normalization: Optional[str],
    channels: int,
    where: str = "data",
) -> Optional[tuple[list[float], list[float]]]:
    """``(mean, std)`` per channel from an explicit choice, or None when nothing was chosen.

    ``normalization="none"`` is the identity (mean 0, std 1); ``"mean_std"`` is implied by giving ``mean``
    and/or ``std`` (a missing one is the identity's). Inconsistent choices raise a one-sentence ``ValueError``.
    """
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise ValueError(f"{where}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "none":
        if mean is not None or std is not None:
            raise ValueError(f"{where}: normalization is 'none' but mean/std are also given; keep only one of the two")
        return [0.0] * channels, [1.0] * channels
    if mean is None and std is None:
        if normalization == "mean_std":
            raise ValueError(f"{where}: normalization is 'mean_std' but mean/std are not given")
        return None
    # one of the two given: the other is the identity's (mean 0 or std 1)
    mean = [0.0] * channels if mean is None else mean
    std = [1.0] * channels if std is None else std
    try:
        mean_l, std_l = [float(v) for v in mean], [float(v) for v in std]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: mean and std must be lists of numbers, got {mean!r} and {std!r}") from None
    if len(mean_l) != channels or len(std_l) != channels:
        raise ValueError(f"{where}: mean/std need {channels} values (one per channel), got {len(mean_l)} and {len(std_l)}")
    if any(not s > 0 for s in std_l):
        raise ValueError(f"{where}: std must be positive, got {std_l}")
    return mean_l, std_l


def normalization_metadata(mean: Tensor, std: Tensor) -> dict[str, Any]:
    """What an observation file records of the victim's input normalisation (docs/observation_format.md)."""
    m, s = mean.flatten().tolist(), std.flatten().tolist()
    if all(v == 0.0 for v in m) and all(v == 1.0 for v in s):
        return {"normalization": "none"}
    return {"mean": [float(v) for v in m], "std": [float(v) for v in s]}


def normalization_from_metadata(metadata: Mapping[str, Any], channels: int) -> Optional[tuple[list[float], list[float]]]:
    """The normalisation an observation file states in its metadata (keys ``mean``/``std`` or
    ``normalization: "none"``), or None when it states none."""
    norm = metadata.get("normalization")
    mean, std = metadata.get("mean"), metadata.get("std")
    if norm is None and mean is None and std is None:
        return None
    return resolve_normalization(mean, std, norm, channels, where="the observation's metadata")


def infer_num_classes(model: nn.Module) -> Optional[int]:
    """The classifier head's width (:func:`~lightning_gi.victim.models.classifier_head`), None without one."""
    head = classifier_head(model)
    return head[1].out_features if head is not None else None




def public_repr(obj: Any) -> str:
    """``Name(arg=value, ...)`` of a defense without its random seed (or private attributes): what the server
    may know about a client's defense; the seed would let it regenerate and subtract the noise."""
    args = ", ".join(
        f"{k}={v!r}" for k, v in vars(obj).items() if not k.startswith("_") and "seed" not in k.lower()
    )
    return f"{type(obj).__name__}({args})"


_DEFAULT_SHAPE = (3, 32, 32)


class Victim(pl.LightningDataModule):
    """The victim: a model, where its data come from (``source``) and what its clients compute and share.

    Args:
        model: the victim architecture (``class_path`` + ``init_args`` in a config), any ``nn.Module``.
        source: where the data come from (:mod:`lightning_gi.victim.sources`): ``DatasetImages`` (default:
            one bundled photograph per client), ``TensorImages`` or ``ObservationFile``.
        weights_path: optional local state dict (.pt/.pth/.safetensors) loaded into ``model``.
        model_seed: re-draw the model's random initialisation from this seed (untrained victims).
        image_shape: (C, H, W) of one input; default the tensors' shape (``TensorImages``), else (3, 32, 32).
        mean, std: the victim's per-channel input normalisation (the client feeds ``(x - mean) / std`` of its
            [0, 1] images). State it once: ``mean`` and ``std``, or ``normalization``.
        normalization: ``"none"`` (the client feeds [0, 1] images unchanged) or ``"mean_std"`` (implied by
            ``mean``/``std``). Required for user models: a wrong normalisation lets the gradient match while the
            reconstruction comes out saturated. Defaults: ``"none"`` for the project's demo victims (models
            defined in lightning_gi, which take [0, 1] images) and for ``TensorImages``; an ``ObservationFile``'s
            metadata when it states one (given in both places, they must agree).
        num_classes: inferred from the model's last linear layer when None.
        train_mode: run the victim in train mode (BN uses batch statistics) instead of eval mode.

    Threat model (simulated clients only; not with an ``ObservationFile``):
        client: the client computation (``FedSGDClient``, the default; ``FedAvgClient``; ``DPSGDClient``).
        num_clients: clients aggregated into one observed update (>= 1); client k holds the k-th of
            ``num_clients`` equal consecutive parts of the source's batch.
        aggregation: ``"mean"`` (FedAvg server average) or ``"sum"`` (secure-aggregation sum).
        defenses: applied in order by every client to its shared tensors (each client its own noise stream).
        share_labels: the clients' labels are part of the observation (all clients, in client order).
        share_num_data_points: the observation's batch_size is the true number of data points; when False it
            is ``assumed_batch_size`` (the attacker's guess) and the client split is not written.
        assumed_batch_size: the attacker's guess when the count is not shared (default: the true count).
        share_buffers: the clients also share their buffers after the update (BN running statistics, averaged
            over clients), in the observation's ``buffers`` and in :attr:`shared_buffers`.
        save_observation: also write the observation to this path (to attack it again later); its metadata
            records the threat model and the normalisation.
    """

    def __init__(
        self,
        model: nn.Module,
        source: Optional[VictimSource] = None,
        weights_path: Optional[str] = None,
        model_seed: Optional[int] = None,
        image_shape: Optional[tuple[int, int, int]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        normalization: Optional[Normalization] = None,
        num_classes: Optional[int] = None,
        train_mode: bool = False,
        client: Optional[ClientUpdate] = None,
        num_clients: int = 1,
        aggregation: Aggregation = "mean",
        defenses: Optional[list[Defense]] = None,
        share_labels: bool = False,
        share_num_data_points: bool = True,
        assumed_batch_size: Optional[int] = None,
        share_buffers: bool = False,
        save_observation: Optional[str] = None,
    ) -> None:
        super().__init__()
        source = DatasetImages() if source is None else source
        if not isinstance(source, VictimSource):
            raise ValueError(
                f"source must be a DatasetImages, TensorImages or ObservationFile (lightning_gi.victim.sources), "
                f"got {type(source).__name__}"
            )
        self.source = source
        if isinstance(source, ObservationFile):
            given = _threat_model_arguments_given(
                client, num_clients, aggregation, defenses, share_labels, share_num_data_points, assumed_batch_size,
                share_buffers, save_observation,
            )
            if given:
                raise ValueError(
                    f"{', '.join(given)} describe a simulated client and do not apply to an observation file, whose "
                    f"metadata states how its update was produced: remove them from the victim's arguments"
                )
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if assumed_batch_size is not None and assumed_batch_size < 1:
            raise ValueError(f"assumed_batch_size must be >= 1, got {assumed_batch_size}")
        if isinstance(source, BatchSource):
            n = source.num_examples(num_clients)
            if n is not None and n % num_clients:
                raise ValueError(f"{n} images cannot be split evenly over num_clients={num_clients}")

        shape = self._image_shape(image_shape, source)
        channels = shape[0]
        if mean is None and std is None and normalization is None and source.normalization_default == "none":
            normalization = "none"  # tensors given in Python are fed as they are
        resolved = resolve_normalization(mean, std, normalization, channels)
        #: whether the normalisation was stated (config/arguments) rather than defaulted
        self.normalization_given = resolved is not None
        if resolved is None:
            if not (is_demo_victim(model) or source.normalization_default == "observation"):
                raise ValueError(
                    f"the input normalisation of the victim {type(model).__name__} is not set: {_NORMALIZATION_FIX}"
                )
            resolved = [0.0] * channels, [1.0] * channels  # demo victims: [0, 1] images (or the file says)
        if model_seed is not None:
            reinitialise(model, model_seed)
        if weights_path is not None:
            load_weights(model, weights_path)
        self.model = model.train(train_mode)
        self.image_shape = shape
        self.mean = torch.tensor(resolved[0], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(resolved[1], dtype=torch.float32).view(-1, 1, 1)
        self.num_classes = num_classes if num_classes is not None else infer_num_classes(model)
        if self.num_classes is None:
            raise ValueError("num_classes cannot be inferred (no nn.Linear in the model): set data.num_classes")
        self.client = client if client is not None else FedSGDClient()
        self.num_clients = num_clients
        self.aggregation = aggregation
        self.defenses = list(defenses or [])
        self.share_labels = share_labels
        self.share_num_data_points = share_num_data_points
        self.assumed_batch_size = assumed_batch_size
        self.share_buffers = share_buffers
        self.save_observation = save_observation
        self.model_state = (
            f"checkpoint:{weights_path}" if weights_path else (f"seed:{model_seed}" if model_seed is not None else "as given")
        )
        #: the buffers the clients shared (``share_buffers=True``), averaged over clients, after setup
        self.shared_buffers: Optional[dict[str, Tensor]] = None
        self._observation: Optional[GradientObservation] = None
        self._ground_truth: Optional[GroundTruth] = None
        self._check_model_accepts_input()

    @staticmethod
    def _image_shape(image_shape: Optional[Sequence[int]], source: VictimSource) -> tuple[int, int, int]:
        fixed = source.image_shape()
        if image_shape is None:
            shape = tuple(fixed) if fixed is not None else _DEFAULT_SHAPE
        else:
            shape = tuple(int(s) for s in image_shape)
            if fixed is not None and shape != tuple(fixed):
                raise ValueError(f"image_shape {shape} differs from the shape {tuple(fixed)} of the source's images")
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {shape}")
        return shape  # type: ignore[return-value]

    @classmethod
    def from_tensors(cls, model: nn.Module, images: Tensor, labels: Tensor, **kwargs: Any) -> "Victim":
        """``Victim(model, source=TensorImages(images, labels), **kwargs)`` (Python use). A ``batch_size`` (per
        client, the former ``ThreatModelVictim.from_tensors`` argument) must equal N / num_clients."""
        batch_size = kwargs.pop("batch_size", None)
        source = TensorImages(images, labels)
        k = int(kwargs.get("num_clients", 1))
        if batch_size is not None and batch_size * k != images.shape[0]:
            raise ValueError(f"batch_size * num_clients must equal the {images.shape[0]} images given")
        return Victim(model, source=source, **kwargs)

    def _check_model_accepts_input(self) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(torch.zeros(1, *self.image_shape))
        except Exception as err:
            raise ValueError(
                f"the victim {type(self.model).__name__} does not accept inputs of shape {self.image_shape}: "
                f"{type(err).__name__}: {err}"
            ) from None
        finally:
            self.model.train(was_training)
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            raise ValueError(
                f"the victim outputs shape {tuple(out.shape)} for one input; expected [1, num_classes={self.num_classes}]"
            )

    # ------------------------------------------------------------------ building the observation
    def private_data(self) -> tuple[Tensor, Tensor]:
        """The clients' private images (in [0,1]) and labels, in client order. Never part of the observation:
        neither they nor what rebuilds them (dataset indices, ``batch_seed``) go into its metadata."""
        if not isinstance(self.source, BatchSource):
            raise ValueError(f"the private data of an observation file are unknown (source {type(self.source).__name__})")
        images, labels = self.source.private_batch(self.image_shape, self.num_clients, int(self.num_classes))
        if int(labels.max()) >= self.num_classes or int(labels.min()) < 0:
            raise ValueError(
                f"the labels {labels.tolist()} of the source '{self.source.name}' are outside [0, {self.num_classes}) "
                f"of the victim"
            )
        return images, labels

    def build_observation(self) -> tuple[GradientObservation, Optional[GroundTruth]]:
        """(what the server observes, the private batch for metrics or None when unknown)."""
        if isinstance(self.source, ObservationFile):
            return self._read_observation(self.source)
        images, labels = self.private_data()
        update = simulate_clients(
            self.model, (images - self.mean) / self.std, labels, self.client, self.num_clients, self.defenses,
            self.aggregation,
        )
        self.shared_buffers = update.buffers if self.share_buffers else None
        n_true = int(images.shape[0])
        metadata: dict[str, Any] = dict(self.client.metadata())
        # Only what the attacker legitimately knows: threat-model hyperparameters, the client split, the dataset's
        # name. Never the batch's dataset indices or batch_seed (they rebuild the private batch), nor a defense's
        # noise seed (it rebuilds the noise, which could then be subtracted).
        metadata.update(
            aggregation=self.aggregation,
            num_clients=self.num_clients,
            num_data_points_shared=self.share_num_data_points,
            buffers_shared=bool(self.share_buffers),
            labels_shared=bool(self.share_labels),
            train_mode=bool(self.model.training),
            model_state=self.model_state,
            dataset=self.source.name,
            defenses=";".join(public_repr(d) for d in self.defenses),
            **normalization_metadata(self.mean, self.std),
        )
        if self.share_num_data_points:
            metadata["client_batch_sizes"] = ",".join([str(n_true // self.num_clients)] * self.num_clients)
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

    def _read_observation(self, source: ObservationFile) -> tuple[GradientObservation, Optional[GroundTruth]]:
        obs = source.load()
        self._apply_observation_normalization(obs.metadata, source.observation_path)
        truth = source.ground_truth(self.image_shape, obs.batch_size, int(self.num_classes))
        return obs, (GroundTruth(*truth) if truth is not None else None)

    def _apply_observation_normalization(self, metadata: Mapping[str, Any], path: str) -> None:
        """Take the normalisation from the file when the config gives none; refuse a conflict."""
        stated = normalization_from_metadata(metadata, self.image_shape[0])
        if stated is None:
            if not (self.normalization_given or is_demo_victim(self.model)):
                raise ValueError(
                    f"the input normalisation of the victim {type(self.model).__name__} is set neither in the config "
                    f"nor in the observation's metadata ({path}): {_NORMALIZATION_FIX}"
                )
            return
        mean = torch.tensor(stated[0], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(stated[1], dtype=torch.float32).view(-1, 1, 1)
        if self.normalization_given:
            if not (torch.allclose(mean, self.mean, atol=1e-6) and torch.allclose(std, self.std, atol=1e-6)):
                raise ValueError(
                    f"the config's normalisation (mean {self.mean.flatten().tolist()}, std {self.std.flatten().tolist()}) "
                    f"contradicts the observation's metadata (mean {stated[0]}, std {stated[1]}) in "
                    f"{path}: remove one of the two or make them agree"
                )
            return
        self.mean, self.std = mean, std

    # ------------------------------------------------------------------ contract
    def setup(self, stage: Optional[str] = None) -> None:
        if self._observation is None:
            obs, gt = self.build_observation()
            obs.check_against(self.model, self.num_classes)
            self._observation, self._ground_truth = obs, gt

    @property
    def observation(self) -> GradientObservation:
        self.setup()
        assert self._observation is not None
        return self._observation

    def attack_inputs(self) -> AttackInputs:
        return AttackInputs(self.model, self.observation, self.image_shape, self.mean, self.std, int(self.num_classes))

    def ground_truth(self) -> Optional[GroundTruth]:
        self.setup()
        return self._ground_truth

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(), batch_size=None, num_workers=0)


VictimDataModule = Victim
"""The CLI's ``data:`` base class (``LightningCLI(..., VictimDataModule, subclass_mode_data=True)``): :class:`Victim`."""


def _threat_model_arguments_given(
    client: Optional[ClientUpdate], num_clients: int, aggregation: str, defenses: Optional[Sequence[Defense]],
    share_labels: bool, share_num_data_points: bool, assumed_batch_size: Optional[int], share_buffers: bool,
    save_observation: Optional[str],
) -> list[str]:
    """The threat-model arguments that differ from their defaults (they describe a simulated client)."""
    given = {
        "client": client is not None,
        "num_clients": num_clients != 1,
        "aggregation": aggregation != "mean",
        "defenses": bool(defenses),
        "share_labels": bool(share_labels),
        "share_num_data_points": not share_num_data_points,
        "assumed_batch_size": assumed_batch_size is not None,
        "share_buffers": bool(share_buffers),
        "save_observation": bool(save_observation),
    }
    return [name for name, is_given in given.items() if is_given]


# --------------------------------------------------------------------------------------------------
# Compatibility names: each maps its former arguments to a source and builds a Victim
# --------------------------------------------------------------------------------------------------
def _source_field(name: str) -> property:
    """A read/write view of ``self.source.<name>``: the compatibility names keep their former attributes."""
    return property(lambda self: getattr(self.source, name), lambda self, value: setattr(self.source, name, value))


class FedSGDVictim(Victim):
    """Former name of ``Victim(source=DatasetImages(dataset, data_root, batch_size, batch_seed, label_mode,
    num_distinct), ...)``; the other arguments are :class:`Victim`'s."""

    def __init__(
        self,
        model: nn.Module,
        dataset: str = "photographs",
        data_root: Optional[str] = None,
        batch_size: int = 1,
        batch_seed: int = 0,
        label_mode: LabelMode = "unique",
        num_distinct: Optional[int] = None,
        **victim: Any,
    ) -> None:
        source = DatasetImages(dataset, data_root, batch_size, batch_seed, label_mode, num_distinct)
        super().__init__(model, source=source, **victim)


class TensorBatchVictim(Victim):
    """Former name of ``Victim(source=TensorImages(images, labels), ...)`` (Python use); the other arguments are
    :class:`Victim`'s. ``images``/``labels`` may be replaced before the observation is built."""

    def __init__(self, model: nn.Module, images: Tensor, labels: Tensor, **victim: Any) -> None:
        super().__init__(model, source=TensorImages(images, labels), **victim)

    images = _source_field("images")
    labels = _source_field("labels")


class ObservationFileVictim(Victim):
    """Former name of ``Victim(source=ObservationFile(observation_path, ground_truth_path), ...)``; the other
    arguments are :class:`Victim`'s (the threat-model ones do not apply)."""

    def __init__(self, model: nn.Module, observation_path: str, ground_truth_path: Optional[str] = None, **victim: Any) -> None:
        super().__init__(model, source=ObservationFile(observation_path, ground_truth_path), **victim)

    observation_path = _source_field("observation_path")
    ground_truth_path = _source_field("ground_truth_path")
