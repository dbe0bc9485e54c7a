"""The iDLG label rule (Zhao et al. 2020, Sec. 3.2) and its batch version for unique labels.

With cross-entropy and non-negative inputs h to the last linear layer (sigmoid/ReLU networks), the
weight gradient row of class c is (p_c - y_c) * h: negative only for the true class. For a batch, the
rows of the classes present are (usually) negative and the others positive, so the N most negative
rows name the N classes when the labels are distinct.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..observation import GradientObservation, ObservationError
from .base import LabelStrategy, classifier_gradients


def idlg_label(weight_gradient: Tensor) -> int:
    """iDLG: the class whose last-layer weight-gradient row has the smallest (negative) sum."""
    return int(weight_gradient.detach().sum(dim=1).argmin())


def negative_row_labels(weight_gradient: Tensor, batch_size: int) -> Tensor:
    """Batch version for unique labels: the ``batch_size`` classes with the most negative row sums."""
    row_sums = weight_gradient.detach().sum(dim=1)
    if batch_size > row_sums.numel():
        raise ObservationError(
            f"unique-label recovery needs batch_size <= num_classes, got {batch_size} > {row_sums.numel()}"
        )
    return torch.argsort(row_sums)[:batch_size].sort().values


class IDLGLabels(LabelStrategy):
    """iDLG's rule for one image; the negative-row rule for a batch of distinct labels.

    ``source``: "weight" uses the weight-gradient rows (exact for non-negative features); "bias" uses the
    bias gradient (p - y), which needs no sign assumption on the features but a bias in the last layer.
    """

    def __init__(self, source: str = "weight") -> None:
        if source not in ("weight", "bias"):
            raise ValueError(f"source must be 'weight' or 'bias', got {source!r}")
        self.source = source

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        weight, bias = classifier_gradients(observation, model)
        rows = weight
        if self.source == "bias":
            if bias is None:
                raise ObservationError("source='bias' needs a bias in the victim's last linear layer")
            rows = bias.unsqueeze(1)
        if observation.batch_size == 1:
            return torch.tensor([idlg_label(rows)])
        return negative_row_labels(rows, observation.batch_size)


class SharedLabels(LabelStrategy):
    """The client shared its labels (a threat model where labels are known): use them."""

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        if observation.labels is None:
            raise ObservationError("SharedLabels: the observation carries no 'labels'")
        return observation.labels.clone()
