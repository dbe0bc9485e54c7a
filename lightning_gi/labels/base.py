"""Label recovery as a function of what the attacker has: (observation, victim model) -> labels.

Every strategy leaves a JSON-serialisable :attr:`LabelStrategy.diagnostics` dict after each call (see
:meth:`LabelStrategy.__call__`): the recovered counts per class and, when the last layer has a bias,
the counts implied by the bias gradient before rounding and the residual of the count equation.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..observation import GradientObservation, ObservationError

log = logging.getLogger("lightning_gi.labels")


class LabelStrategy(ABC):
    """A label-recovery rule. Subclasses implement :meth:`recover`; attacks call the object.

    After each call, :attr:`diagnostics` (a dict of floats/ints/lists/strings, safe for ``json.dumps``)
    describes the result; subclasses add their own keys with :meth:`note` inside :meth:`recover`.
    Common keys (set by :meth:`__call__`): ``strategy``, ``batch_size``, ``counts`` ({class: count}),
    ``num_classes_present`` and, when the victim's last layer has a bias, ``bias_implied_counts``
    (``N/C - N dL/db``, the uniform-probability estimate, one float per class), ``count_residual_max``
    and ``count_residual_l1`` (``|implied - recovered|``; large values mean the uniform estimate and the
    recovered counts disagree, e.g. a trained victim).
    """

    diagnostics: dict[str, Any]

    @abstractmethod
    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        """Labels [batch_size] from what the attacker has."""

    def adopt_input_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Called by the attack before recovery with the victim's input normalisation. Strategies that feed
        public images to the victim (:class:`~lightning_gi.labels.CalibratedCounts`, ``AutoLabels`` with public
        images) take it where none was given, so that the images are normalised as the client's; others ignore it."""

    def note(self, **values: Any) -> None:
        """Add entries to :attr:`diagnostics` (for use inside :meth:`recover`)."""
        if "diagnostics" not in self.__dict__:
            self.diagnostics = {}
        self.diagnostics.update(values)

    def __call__(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        self.diagnostics = {}
        labels = self.recover(observation, model).long().reshape(-1).cpu()
        if labels.numel() != observation.batch_size:
            raise ObservationError(
                f"{type(self).__name__} recovered {labels.numel()} labels for batch_size {observation.batch_size}"
            )
        self.diagnostics = {**common_diagnostics(self, labels, observation, model), **self.diagnostics}
        return labels


def _owner_name(model: nn.Module, param: Tensor) -> str:
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p is param:
                return f"{name or '<root>'} ({type(module).__name__})"
    return "<unknown>"


def last_linear(model: nn.Module) -> nn.Linear:
    """The victim's classifier head: its last ``nn.Linear``, which must also be its last parametrised layer.

    Gradient label recovery reads ``dL/dW = (P - Y)^T H / N`` of the layer producing the logits; if
    another parametrised layer follows the last linear one (a convolutional head, a final norm layer),
    that identity does not hold and any label read from it would be wrong, so this raises.
    """
    from ..victim.models import classifier_head

    params = list(model.parameters())
    found = classifier_head(model)
    if not params:
        raise ObservationError(f"{type(model).__name__} has no parameters: there is no classifier layer to read labels from")
    if found is None:
        raise ObservationError(
            f"gradient label recovery needs an nn.Linear classifier head, but {type(model).__name__} has no nn.Linear "
            f"(its last layer is {_owner_name(model, params[-1])})"
        )
    head = found[1]
    if not (params[-1] is head.weight or (head.bias is not None and params[-1] is head.bias)):
        raise ObservationError(
            f"gradient label recovery needs the last layer to be nn.Linear, but {type(model).__name__}'s last "
            f"parametrised layer is {_owner_name(model, params[-1])}, after its last nn.Linear"
        )
    return head


def classifier_layer_index(observation: GradientObservation, model: Optional[nn.Module] = None) -> int:
    """Index (in ``model.parameters()`` order) of the last linear layer's weight, whose gradient leaks labels.

    With a model: the weight of its last ``nn.Linear``, which must be the model's last layer
    (:func:`last_linear` raises :class:`ObservationError` otherwise). Without: the last 2-D gradient tensor.
    """
    if model is not None:
        weight = last_linear(model).weight
        for i, p in enumerate(model.parameters()):
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
    if model is not None:
        head = last_linear(model)
        if head.bias is None:
            return weight, None
        j = next(k for k, p in enumerate(model.parameters()) if p is head.bias)
        return weight, observation.gradients[j]
    bias = None
    if i + 1 < len(observation.gradients):
        nxt = observation.gradients[i + 1]
        if nxt.ndim == 1 and nxt.shape[0] == weight.shape[0]:
            bias = nxt
    return weight, bias


def loss_scale(observation: GradientObservation, loss_reduction: Optional[str] = None) -> float:
    """Factor turning the observed gradient into the gradient of the SUMMED loss: N for "mean", 1 for "sum"."""
    reduction = loss_reduction or observation.loss_reduction
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}")
    return float(observation.batch_size) if reduction == "mean" else 1.0


def label_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Count per class ``[num_classes]`` of a label vector."""
    return torch.bincount(labels.long().reshape(-1), minlength=num_classes)[:num_classes]


def common_diagnostics(
    strategy: LabelStrategy, labels: Tensor, observation: GradientObservation, model: Optional[nn.Module]
) -> dict[str, Any]:
    """Diagnostics every strategy reports (see :class:`LabelStrategy`)."""
    uniq, cnt = torch.unique(labels, return_counts=True)
    out: dict[str, Any] = {
        "strategy": type(strategy).__name__,
        "batch_size": int(observation.batch_size),
        "counts": {str(int(c)): int(k) for c, k in zip(uniq, cnt)},
        "num_classes_present": int(uniq.numel()),
    }
    try:
        weight, bias = classifier_gradients(observation, model)
    except ObservationError:
        return out
    if bias is None or bias.numel() != weight.shape[0]:
        return out
    c = bias.numel()
    n = observation.batch_size
    implied = n / c - loss_scale(observation) * bias.detach().double().cpu()
    if bool((labels >= c).any()):
        return out
    resid = (implied - label_counts(labels, c).double()).abs()
    out["bias_implied_counts"] = [round(float(v), 4) for v in implied]
    out["count_residual_max"] = float(resid.max())
    out["count_residual_l1"] = float(resid.sum())
    return out
