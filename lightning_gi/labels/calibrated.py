"""Label counts from the bias gradient with class probabilities measured on labelled public images.

iLRG's count system (Ma et al., ICLR 2023, Eq. 8-9; docs/labels.md Eq. 1)

    sum_j n_j (P_j[i] - delta_ij) = G_b[i]   (i = 1..C),      sum_j n_j = N

is exact when ``P_j`` is the batch's MEAN softmax vector over its class-``j`` samples. iLRG estimates
``P_j`` from the gradient (the softmax of a class embedding), which fails once the victim has learned
its classes: the mean of the samples' softmaxes then differs from the softmax of their mean by more than
the ~0.01 the system tolerates. :class:`CalibratedCounts` instead MEASURES ``P_j`` as the victim's mean
softmax over public images of class ``j`` (the auxiliary-data idea of Wainakh et al.'s LLG*, PoPETs 2022,
applied to iLRG's system). Threat model: the attacker holds labelled images of the victim's classes that
are NOT the client's (e.g. a public test split) and the victim model, as every strategy here does.
Classes without public images get the victim's mean softmax over all public images.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..observation import GradientObservation, ObservationError
from .base import LabelStrategy, classifier_gradients, loss_scale
from .counting import counts_to_label_vector, round_counts, solve_count_system

__all__ = ["CalibratedCounts", "class_mean_softmax", "class_means", "image_softmax"]


@torch.no_grad()
def image_softmax(model: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """The model's softmax [M, C] (float64, on the CPU) of each of ``images`` (model inputs)."""
    device = next(model.parameters()).device
    return torch.cat([torch.softmax(model(images[s:s + batch_size].to(device)).double(), dim=1).cpu()
                      for s in range(0, images.shape[0], batch_size)])


def class_means(probs: Tensor, labels: Tensor, num_classes: int, keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(``P`` [C, C]: row ``j`` = the mean of ``probs`` over the images labelled ``j`` (the mean over all images
    for classes without any), ``present`` [C] bool), over the images where ``keep`` (bool [M]) is true."""
    if probs.shape[1] != num_classes:
        raise ObservationError(f"the victim outputs {probs.shape[1]} classes but its last layer's gradient has {num_classes}")
    labels = labels.long().cpu()
    if keep is not None:
        probs, labels = probs[keep], labels[keep]
    table = probs.mean(dim=0).expand(num_classes, num_classes).clone()
    present = torch.zeros(num_classes, dtype=torch.bool)
    for c in labels.unique():
        c = int(c)
        if not 0 <= c < num_classes:
            raise ValueError(f"public label {c} is outside the victim's {num_classes} classes")
        table[c] = probs[labels == c].mean(dim=0)
        present[c] = True
    return table, present


def class_mean_softmax(model: nn.Module, images: Tensor, labels: Tensor, num_classes: int, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(``P`` [C, C] float64: row ``j`` = the model's mean softmax over the images labelled ``j``, the overall
    mean for classes without images; ``present`` [C] bool: classes with images). ``images`` are model inputs."""
    return class_means(image_softmax(model, images, batch_size), labels, num_classes)


class CalibratedCounts(LabelStrategy):
    """Counts from iLRG's system with each class's probabilities measured on labelled public images (module docs).

    Args:
        public_path: a ``.pt`` file holding ``{"images": float [M, C, H, W] in [0, 1], "labels": long [M]}``
            (read with ``torch.load(weights_only=True)``: no code runs); or use :meth:`from_tensors`.
        mean, std: the victim's input normalisation, applied to the public images (None: none).
        batch_size: public images per forward pass.

    Diagnostics: ``implied_counts`` (least-squares counts before rounding), ``system_residual`` (max over classes
    of ``|sum_j n_j (P_j[i] - delta_ij) - G_b[i]|`` for the rounded counts, in samples), ``public_classes`` (classes
    with public images), ``public_p_true`` (the victim's mean probability of the true class on the public images).
    """

    def __init__(
        self,
        public_path: Optional[str] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (the victim's input normalisation) or neither")
        self.public_path, self.mean, self.std, self.batch_size = public_path, mean, std, int(batch_size)
        self._images: Optional[Tensor] = None
        self._labels: Optional[Tensor] = None
        self._table: Optional[tuple[weakref.ref, Tensor]] = None  # (the model, softmax of each public image)

    @classmethod
    def from_tensors(cls, images: Tensor, labels: Tensor, mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None, batch_size: int = 64) -> "CalibratedCounts":
        """From public images ([M, C, H, W] in [0, 1]) and their labels ([M]) already in memory."""
        strategy = cls(mean=mean, std=std, batch_size=batch_size)
        strategy._set_public(images, labels)
        return strategy

    def _set_public(self, images: Tensor, labels: Tensor) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise ValueError(f"public images must be [M, C, H, W] with M labels, got {tuple(images.shape)} and {tuple(labels.shape)}")
        self._images, self._labels = images.float(), labels.long()

    def public_images(self) -> tuple[Tensor, Tensor]:
        """(images [M, C, H, W] in [0, 1], labels [M]), read from ``public_path`` on first use."""
        if self._images is None:
            if self.public_path is None:
                raise ValueError("CalibratedCounts needs labelled public images: public_path or from_tensors(...)")
            try:
                blob = torch.load(self.public_path, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise ValueError(f"public_path {self.public_path!r} does not exist") from None
            except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
                raise ValueError(f"public_path {self.public_path!r} is not a readable tensor file ({type(err).__name__})") from None
            if not isinstance(blob, dict) or not {"images", "labels"} <= set(blob):
                raise ValueError(f"public_path {self.public_path!r} must hold a dict with 'images' and 'labels'")
            self._set_public(torch.as_tensor(blob["images"]), torch.as_tensor(blob["labels"]))
        assert self._images is not None and self._labels is not None
        return self._images, self._labels

    def adopt_input_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if self.mean is None:
            self.mean, self.std = list(mean), list(std)
            self._table = None

    def victim_inputs(self, images: Tensor) -> Tensor:
        """``images`` normalised as the victim's inputs (``mean``/``std``)."""
        if self.mean is None:
            return images
        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def public_softmax(self, model: nn.Module) -> Tensor:
        """The victim's softmax [M, C] of each public image (eval mode), measured once per victim model."""
        if self._table is None or self._table[0]() is not model:
            images, _ = self.public_images()
            was_training = model.training
            model.eval()
            try:
                probs = image_softmax(model, self.victim_inputs(images), self.batch_size)
            finally:
                model.train(was_training)
            self._table = (weakref.ref(model), probs)
        return self._table[1]

    def probabilities(self, model: nn.Module, num_classes: int, keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``P`` and the classes with public images, from the public images where ``keep`` (bool [M]; None: all)."""
        return class_means(self.public_softmax(model), self.public_images()[1], num_classes, keep)

    def held_out(self, keep: Tensor) -> "LabelStrategy":
        """This strategy measured on the public images where ``keep`` is true only (the rehearsal scores it on the
        others); shares the measured softmaxes."""
        return _CalibratedSubset(self, keep)

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        return self.recover_from(observation, model, None)

    def recover_from(self, observation: GradientObservation, model: nn.Module, keep: Optional[Tensor]) -> Tensor:
        """:meth:`recover` with ``P`` measured on the public images where ``keep`` is true (None: all)."""
        _, bias = classifier_gradients(observation, model)
        if bias is None:
            raise ObservationError("CalibratedCounts needs a bias in the victim's last linear layer; this one has none")
        g = bias.detach().double().cpu() * loss_scale(observation)
        n, c = observation.batch_size, g.numel()
        table, present = self.probabilities(model, c, keep)
        a, solution = solve_count_system(table, g, n)
        counts = round_counts(solution, n, np.clip(g.numpy() + solution, 0.0, None) + 0.1)  # as ILRG's rounding
        classes = present.nonzero().flatten()
        self.note(
            implied_counts=[round(float(v), 4) for v in solution],
            system_residual=float(np.abs(a @ counts - g.numpy()).max()),
            public_classes=int(present.sum()),
            public_p_true=float(table[classes, classes].mean()),
        )
        return counts_to_label_vector(counts)


class _CalibratedSubset(LabelStrategy):
    """:class:`CalibratedCounts` measured on a subset of its public images (:meth:`CalibratedCounts.held_out`)."""

    def __init__(self, parent: CalibratedCounts, keep: Tensor) -> None:
        self.parent, self.keep = parent, keep

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        labels = self.parent.recover_from(observation, model, self.keep)
        self.note(**self.parent.diagnostics)
        return labels
