"""Label recovery as a function of what the attacker has: (observation, victim model) -> labels."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import Tensor, nn

from ..observation import GradientObservation, ObservationError


class LabelStrategy(ABC):
    """A label-recovery rule. Subclasses implement :meth:`recover`; attacks call the object."""

    @abstractmethod
    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        """Labels [batch_size] from what the attacker has."""

    def __call__(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        labels = self.recover(observation, model).long().reshape(-1).cpu()
        if labels.numel() != observation.batch_size:
            raise ObservationError(
                f"{type(self).__name__} recovered {labels.numel()} labels for batch_size {observation.batch_size}"
            )
        return labels


def classifier_layer_index(observation: GradientObservation, model: Optional[nn.Module] = None) -> int:
    """Index (in ``model.parameters()`` order) of the last linear layer's weight, whose gradient leaks labels.

    With a model: the weight of its last ``nn.Linear``. Without: the last 2-D gradient tensor.
    """
    if model is not None:
        params = list(model.parameters())
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:
            weight = linears[-1].weight
            for i, p in enumerate(params):
                if p is weight:
                    return i
    for i in range(len(observation.gradients) - 1, -1, -1):
        if observation.gradients[i].ndim == 2:
            return i
    raise ObservationError("no 2-D gradient tensor (a linear classifier weight) in the observation")


def classifier_gradients(observation: GradientObservation, model: Optional[nn.Module] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(weight gradient [classes, features], bias gradient [classes] or None) of the last linear layer."""
    i = classifier_layer_index(observation, model)
    weight = observation.gradients[i]
    bias = None
    if i + 1 < len(observation.gradients):
        nxt = observation.gradients[i + 1]
        if nxt.ndim == 1 and nxt.shape[0] == weight.shape[0]:
            bias = nxt
    return weight, bias
