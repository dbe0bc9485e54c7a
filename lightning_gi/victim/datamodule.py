"""DataModules that supply the victim: the model the server knows, and the gradient it observed.

Two sources share one base class:
- :class:`FedSGDVictim` simulates a client: bundled/real images, a batch chosen by seed, the batch-mean
  cross-entropy gradient, defenses applied. The ground truth is kept for metrics only.
- :class:`ObservationFileVictim` reads a gradient captured elsewhere (docs/observation_format.md).

The attack sees :meth:`VictimDataModule.attack_inputs` (model + observation + input geometry), never the
ground truth (:meth:`VictimDataModule.ground_truth`), which only metric/monitor callbacks read. Observation
metadata (also written to observation files) never holds what rebuilds the private batch (dataset indices,
``batch_seed``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ..observation import GradientObservation, ObservationError, capture_observation, load_ground_truth
from .defenses import Defense
from .models import load_weights, reinitialise


@dataclass
class GroundTruth:
    """The private batch (images in [0,1] image space, labels). Never shown to an attack."""

    images: Tensor
    labels: Tensor


@dataclass
class AttackInputs:
    """Everything an attack may use: what an honest-but-curious server has."""

    model: nn.Module
    observation: GradientObservation
    image_shape: tuple[int, int, int]
    mean: Tensor  # [C,1,1], the victim's input normalisation
    std: Tensor
    num_classes: int

    def to_image_space(self, x: Tensor) -> Tensor:
        """Undo the victim's normalisation: model input -> [0,1]-range image (not clamped)."""
        return x * self.std.to(x) + self.mean.to(x)

    def to_input_space(self, images: Tensor) -> Tensor:
        return (images - self.mean.to(images)) / self.std.to(images)


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


def is_bundled(dataset: str) -> bool:
    """The offline datasets shipped with the package ("photographs", "digits")."""
    return str(dataset).lower().replace("-", "").replace("_", "") in ("photographs", "digits")


def infer_num_classes(model: nn.Module) -> Optional[int]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


class VictimDataModule(pl.LightningDataModule, ABC):
    """Base: the victim model (any nn.Module), its weights and input geometry.

    Args:
        model: the victim architecture (``class_path`` + ``init_args`` in a config).
        weights_path: optional local state dict (.pt/.pth/.safetensors) loaded into ``model``.
        model_seed: re-draw the model's random initialisation from this seed (untrained victims).
        image_shape: (C, H, W) of one input.
        mean, std: the victim's per-channel input normalisation (the client feeds ``(x - mean) / std`` of
            its [0, 1] images). An explicit choice: give ``mean`` and ``std``, or ``normalization="none"``.
        num_classes: inferred from the model's last linear layer when None.
        train_mode: run the victim in train mode (BN uses batch statistics) instead of eval mode.
        normalization: ``"none"`` (the client feeds [0, 1] images unchanged) or ``"mean_std"`` (implied by
            ``mean``/``std``). Required for user models: a wrong normalisation lets the gradient match while
            the reconstruction comes out saturated. Only the project's demo victims (models defined in
            lightning_gi: LeNet, ConvNet, AuditCNN), which take [0, 1] images, default to ``"none"``; :class:`ObservationFileVictim` also reads it from the
            observation's metadata.
    """

    _reads_normalization_from_observation = False

    def __init__(
        self,
        model: nn.Module,
        weights_path: Optional[str] = None,
        model_seed: Optional[int] = None,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        num_classes: Optional[int] = None,
        train_mode: bool = False,
        normalization: Optional[Normalization] = None,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        channels = image_shape[0]
        resolved = resolve_normalization(mean, std, normalization, channels)
        #: whether the normalisation was stated (config/arguments) rather than defaulted
        self.normalization_given = resolved is not None
        if resolved is None:
            if not (is_demo_victim(model) or self._reads_normalization_from_observation):
                raise ValueError(
                    f"the input normalisation of the victim {type(model).__name__} is not set: {_NORMALIZATION_FIX}"
                )
            resolved = [0.0] * channels, [1.0] * channels  # demo victims: [0, 1] images (or the file says)
        mean, std = resolved
        if model_seed is not None:
            reinitialise(model, model_seed)
        if weights_path is not None:
            load_weights(model, weights_path)
        self.model = model.train(train_mode)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.num_classes = num_classes if num_classes is not None else infer_num_classes(model)
        if self.num_classes is None:
            raise ValueError("num_classes cannot be inferred (no nn.Linear in the model): set data.num_classes")
        self._observation: Optional[GradientObservation] = None
        self._ground_truth: Optional[GroundTruth] = None
        self._check_model_accepts_input()

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

    # ------------------------------------------------------------------ to override
    @abstractmethod
    def build_observation(self) -> tuple[GradientObservation, Optional[GroundTruth]]:
        """(what the server observes, the private batch for metrics or None when unknown)."""

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


class FedSGDVictim(VictimDataModule):
    """A simulated FedSGD client: one batch's mean cross-entropy gradient, with defenses applied.

    Args:
        dataset: "photographs" / "digits" (bundled, offline), "mnist", "fashionmnist", "svhn",
            "cifar10", "cifar100" or "imagefolder" (with ``data_root``).
        data_root: root directory for torchvision datasets / ImageFolder (nothing is downloaded).
        batch_size: images in the private batch.
        batch_seed: which batch (and which crops of the bundled photographs).
        label_mode: "unique", "repeated" or "random" labels in the batch.
        num_distinct: number of distinct classes for label_mode="repeated".
        share_labels: the client also shares its labels (stored in the observation).
        defenses: applied in order to the gradient before it is shared.
        save_observation: also write the observation to this path (to attack it again later); its
            metadata records the normalisation (``mean``/``std`` or ``normalization: "none"``).
        The bundled datasets serve a victim with fewer outputs than they have classes (the photographs
        have 14): the batch is drawn from their first ``num_classes`` classes (:func:`select_batch`).
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: str = "photographs",
        data_root: Optional[str] = None,
        batch_size: int = 1,
        batch_seed: int = 0,
        label_mode: str = "unique",
        num_distinct: Optional[int] = None,
        share_labels: bool = False,
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset_name = dataset
        self.data_root = data_root
        self.batch_size = batch_size
        self.batch_seed = batch_seed
        self.label_mode = label_mode
        self.num_distinct = num_distinct
        self.share_labels = share_labels
        self.defenses = list(defenses or [])
        self.save_observation = save_observation

    def build_observation(self) -> tuple[GradientObservation, Optional[GroundTruth]]:
        from .data import build_dataset, select_batch

        c, h, w = self.image_shape
        if h != w:
            raise ValueError(f"bundled/torchvision datasets give square images; image_shape is {self.image_shape}")
        dataset = build_dataset(self.dataset_name, root=self.data_root, image_size=h, channels=c)
        images, labels, _ = select_batch(
            dataset, self.batch_size, seed=self.batch_seed, label_mode=self.label_mode, num_distinct=self.num_distinct,
            num_classes=self.num_classes if is_bundled(self.dataset_name) else None,
        )
        if int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"dataset '{self.dataset_name}' has labels up to {int(labels.max())} but the victim has "
                f"num_classes={self.num_classes}"
            )
        obs = capture_observation(
            self.model,
            (images - self.mean) / self.std,
            labels,
            defenses=self.defenses,
            share_labels=self.share_labels,
            # what an attacker may know; never the batch's dataset indices or batch_seed, which rebuild the
            # private batch exactly (the ground truth travels only in GroundTruth)
            metadata={"dataset": self.dataset_name, **normalization_metadata(self.mean, self.std)},
        )
        if self.save_observation:
            obs.save(self.save_observation)
        return obs, GroundTruth(images.clone(), labels.clone())


class ObservationFileVictim(VictimDataModule):
    """A gradient captured elsewhere, read from an observation file (docs/observation_format.md).

    Args:
        observation_path: the ``torch.save``d observation dict.
        ground_truth_path: optional ``torch.save``d {"images": [N,C,H,W] in [0,1], "labels": [N]} for metrics.
        mean, std / normalization: as :class:`VictimDataModule`; when not given, read from the observation's
            metadata (``mean``/``std`` lists or ``normalization: "none"``). Given in both places, they must agree.
    """

    _reads_normalization_from_observation = True

    def __init__(
        self,
        model: nn.Module,
        observation_path: str,
        ground_truth_path: Optional[str] = None,
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
        self.observation_path = observation_path
        self.ground_truth_path = ground_truth_path

    def build_observation(self) -> tuple[GradientObservation, Optional[GroundTruth]]:
        obs = GradientObservation.load(self.observation_path)
        self._apply_observation_normalization(obs.metadata)
        gt = None
        if self.ground_truth_path:
            images, labels = load_ground_truth(self.ground_truth_path, self.image_shape, obs.batch_size, self.num_classes)
            gt = GroundTruth(images, labels if labels is not None else torch.full((obs.batch_size,), -1))
        return obs, gt


    def _apply_observation_normalization(self, metadata: Mapping[str, Any]) -> None:
        """Take the normalisation from the file when the config gives none; refuse a conflict."""
        stated = normalization_from_metadata(metadata, self.image_shape[0])
        if stated is None:
            if not (self.normalization_given or is_demo_victim(self.model)):
                raise ValueError(
                    f"the input normalisation of the victim {type(self.model).__name__} is set neither in the config "
                    f"nor in the observation's metadata ({self.observation_path}): {_NORMALIZATION_FIX}"
                )
            return
        mean = torch.tensor(stated[0], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(stated[1], dtype=torch.float32).view(-1, 1, 1)
        if self.normalization_given:
            if not (torch.allclose(mean, self.mean, atol=1e-6) and torch.allclose(std, self.std, atol=1e-6)):
                raise ValueError(
                    f"the config's normalisation (mean {self.mean.flatten().tolist()}, std {self.std.flatten().tolist()}) "
                    f"contradicts the observation's metadata (mean {stated[0]}, std {stated[1]}) in "
                    f"{self.observation_path}: remove one of the two or make them agree"
                )
            return
        self.mean, self.std = mean, std


class TensorBatchVictim(VictimDataModule):
    """A FedSGD client on a batch given as tensors (for Python use: notebooks, tests, benchmarks).

    Args:
        images: [N,C,H,W] in [0,1] image space; labels: [N].
        normalization: defaults to ``"none"`` here (the tensors are fed as given) unless ``mean``/``std`` are
            passed; the config-facing DataModules require the choice instead.
    """

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        defenses: Optional[list[Defense]] = None,
        share_labels: bool = False,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        num_classes: Optional[int] = None,
        train_mode: bool = False,
        normalization: Optional[Normalization] = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N,C,H,W], got {tuple(images.shape)}")
        if normalization is None and mean is None and std is None:
            normalization = "none"
        super().__init__(model, None, None, tuple(images.shape[1:]), mean, std, num_classes, train_mode, normalization)
        self.images, self.labels = images.detach().float(), labels.detach().long()
        self.defenses = list(defenses or [])
        self.share_labels = share_labels

    def build_observation(self) -> tuple[GradientObservation, Optional[GroundTruth]]:
        if int(self.labels.max()) >= self.num_classes or int(self.labels.min()) < 0:
            raise ValueError(f"labels {self.labels.tolist()} outside [0, {self.num_classes})")
        obs = capture_observation(
            self.model, (self.images - self.mean) / self.std, self.labels, self.defenses, self.share_labels
        )
        return obs, GroundTruth(self.images.clone(), self.labels.clone())
