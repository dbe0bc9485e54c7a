"""Where a victim's data come from: the ``source`` of :class:`lightning_gi.victim.Victim`.

A source answers one question and nothing else:

- :class:`DatasetImages` and :class:`TensorImages` (a :class:`BatchSource`): "the clients' private batch",
  images in [0, 1] and labels, in client order. The :class:`~lightning_gi.victim.Victim` then runs the
  client simulation (:mod:`lightning_gi.client`) on it to produce the observation.
- :class:`ObservationFile`: "the observation captured elsewhere (and, optionally, its ground truth)". No
  client is simulated; the file's metadata says how the update was produced.

What rebuilds the private batch (dataset indices, ``batch_seed``) stays inside the source: the victim writes
only :attr:`BatchSource.name` (the dataset's name) into the observation's metadata.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor

from ..observation import GradientObservation, load_ground_truth
from .data import DATASET_NAMES, LABEL_MODES, LabelMode, build_dataset, dataset_key, is_bundled, select_batch

NormalizationDefault = Literal["required", "none", "observation"]


class VictimSource(ABC):
    """Base of the victim's sources (a config names one under ``data.init_args.source``)."""

    #: what the victim assumes when neither ``mean``/``std`` nor ``normalization`` is stated: ``"required"``
    #: (refuse a user model), ``"none"`` (the data are fed as given) or ``"observation"`` (the file's metadata)
    normalization_default: ClassVar[NormalizationDefault] = "required"

    def image_shape(self) -> Optional[tuple[int, int, int]]:
        """The (C, H, W) the source fixes, or None when the victim's ``image_shape`` decides."""
        return None


class BatchSource(VictimSource):
    """A source of the clients' private batch (the victim simulates the clients on it)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """What the observation's metadata may say about the data (``dataset``): a name, never indices or seeds."""

    @abstractmethod
    def num_examples(self, num_clients: int) -> Optional[int]:
        """The number of private examples over all clients (None until the data are read)."""

    @abstractmethod
    def private_batch(
        self, image_shape: tuple[int, int, int], num_clients: int, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        """``(images [N,C,H,W] in [0, 1], labels [N])`` of all clients in client order (client k holds the k-th
        of ``num_clients`` equal consecutive parts)."""


class DatasetImages(BatchSource):
    """A seeded batch per client from a dataset: the bundled offline sets, a torchvision dataset or an ImageFolder.

    Args:
        dataset: ``"photographs"`` / ``"digits"`` (bundled, offline), ``"mnist"``, ``"fashionmnist"``, ``"svhn"``,
            ``"cifar10"``, ``"cifar100"`` or ``"imagefolder"`` (with ``data_root``).
        data_root: root directory of a torchvision dataset / ImageFolder (nothing is downloaded).
        batch_size: images per client (all clients together hold ``num_clients * batch_size``, drawn at once).
        batch_seed: which batch (and which crops of the bundled photographs).
        label_mode: ``"unique"``, ``"repeated"`` or ``"random"`` labels (:func:`~lightning_gi.victim.data.select_batch`).
        num_distinct: the number of distinct classes for ``label_mode="repeated"``.

    A victim with fewer outputs than a bundled dataset has classes (the photographs have 14) gets a batch from the
    dataset's first ``num_classes`` classes, labels unchanged.
    """

    def __init__(
        self,
        dataset: str = "photographs",
        data_root: Optional[str] = None,
        batch_size: int = 1,
        batch_seed: int = 0,
        label_mode: LabelMode = "unique",
        num_distinct: Optional[int] = None,
    ) -> None:
        if dataset_key(dataset) not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASET_NAMES)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if num_distinct is not None and label_mode != "repeated":
            raise ValueError(f"num_distinct is only used with label_mode='repeated' (got label_mode={label_mode!r})")
        self.dataset = dataset
        self.data_root = data_root
        self.batch_size = batch_size
        self.batch_seed = batch_seed
        self.label_mode = label_mode
        self.num_distinct = num_distinct

    @property
    def name(self) -> str:
        return str(self.dataset)

    def num_examples(self, num_clients: int) -> Optional[int]:
        return self.batch_size * num_clients

    def private_batch(
        self, image_shape: tuple[int, int, int], num_clients: int, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        c, h, w = image_shape
        if h != w:
            raise ValueError(f"dataset '{self.dataset}' gives square images but image_shape is {tuple(image_shape)}")
        data = build_dataset(self.dataset, root=self.data_root, image_size=h, channels=c)
        images, labels, _ = select_batch(  # the indices stay here: they rebuild the private batch
            data,
            self.batch_size * num_clients,
            seed=self.batch_seed,
            label_mode=self.label_mode,
            num_distinct=self.num_distinct,
            num_classes=num_classes if is_bundled(self.dataset) else None,
        )
        return images, labels


class TensorImages(BatchSource):
    """The private batch given as tensors (Python use: notebooks, tests, benchmarks).

    Args:
        images: [N, C, H, W] in [0, 1] image space (they fix the victim's ``image_shape``).
        labels: [N] class indices.

    With this source the victim's normalisation defaults to ``"none"`` (the tensors are fed as given) unless
    ``mean``/``std`` are stated.
    """

    normalization_default: ClassVar[NormalizationDefault] = "none"

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a tensor [N,C,H,W], got {getattr(images, 'shape', type(images))}")
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.numel() != images.shape[0]:
            raise ValueError(f"need labels [N] for images [N,C,H,W], got {tuple(labels.shape)} and {tuple(images.shape)}")
        self.images = images.detach().float()
        self.labels = labels.detach().long()

    @property
    def name(self) -> str:
        return "tensors"

    def image_shape(self) -> Optional[tuple[int, int, int]]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def num_examples(self, num_clients: int) -> Optional[int]:
        return int(self.images.shape[0])

    def private_batch(
        self, image_shape: tuple[int, int, int], num_clients: int, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        return self.images, self.labels


class ObservationFile(VictimSource):
    """An observation captured elsewhere (docs/observation_format.md), optionally with its ground truth.

    Args:
        observation_path: the observation file (``GradientObservation.save`` / ``torch.save`` of its dict).
        ground_truth_path: optional ``{"images": [N,C,H,W] in [0, 1], "labels": [N]}`` for metrics only.

    The victim reads the normalisation from the file's metadata when the config states none. The threat-model
    arguments of the victim (client, num_clients, defenses, ...) do not apply: the file says what was shared.
    """

    normalization_default: ClassVar[NormalizationDefault] = "observation"

    def __init__(self, observation_path: str, ground_truth_path: Optional[str] = None) -> None:
        self.observation_path = observation_path
        self.ground_truth_path = ground_truth_path

    def load(self) -> GradientObservation:
        return GradientObservation.load(self.observation_path)

    def ground_truth(
        self, image_shape: tuple[int, int, int], batch_size: int, num_classes: int
    ) -> Optional[tuple[Tensor, Tensor]]:
        """``(images, labels)`` from ``ground_truth_path`` (labels -1 when the file has none), or None."""
        if not self.ground_truth_path:
            return None
        images, labels = load_ground_truth(self.ground_truth_path, image_shape, batch_size, num_classes)
        return images, labels if labels is not None else torch.full((batch_size,), -1)


__all__ = ["BatchSource", "DatasetImages", "ObservationFile", "TensorImages", "VictimSource"]
