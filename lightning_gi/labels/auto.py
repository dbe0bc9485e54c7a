"""The default label strategy (``auto``) and the name registry of every strategy.

``AutoLabels`` picks, from what the victim's last layer offers:

1. a bias in the last linear layer -> :class:`~lightning_gi.labels.counting.ILRG` with 6 refinement
   steps (or
   :class:`~lightning_gi.labels.counting.BiasCounts` with ``with_bias="bias_counts"``): counts from the
   bias gradient, exact at large batch while the victim is not converged;
2. no bias, batch > 1 -> the evolutionary CV search of Ye et al. (:class:`EvolutionaryLabelCounts`);
3. batch of one, or the evolutionary search cannot run on this victim (e.g. its public statistics do
   not fit the input geometry) -> the iDLG rule (negative rows; :class:`LLG` when batch > classes).

The choice is kept in :attr:`AutoLabels.chosen_name` / :attr:`AutoLabels.chosen`, in
``diagnostics["chosen_strategy"]`` / ``diagnostics["choice_reason"]``, and logged (logger
``lightning_gi.labels``, level INFO).
"""
from __future__ import annotations

import logging
from typing import Literal, Optional, Sequence

from torch import Tensor, nn

from ..observation import GradientObservation, ObservationError
from .base import LabelStrategy, classifier_gradients
from .counting import ILRG, BiasCounts
from .evolutionary import CoarseLabelCounts, EvolutionaryLabelCounts
from .heuristics import LLG, BiasCorrectedLabels, WainakhLabels, YinLabels
from .idlg import IDLGLabels, SharedLabels

log = logging.getLogger("lightning_gi.labels")

__all__ = ["AutoLabels", "LABEL_STRATEGIES", "label_strategy"]


class AutoLabels(LabelStrategy):
    """``auto``: ILRG/BiasCounts with a biased head, else the evolutionary search, else the iDLG rule.

    Args:
        with_bias: strategy for a biased head: "ilrg" (default; robust to non-uniform predictions) or
            "bias_counts" (uniform-probability estimate).
        image_size, mean, std, stats_path, aux_source: passed to :class:`EvolutionaryLabelCounts` for a
            head without bias (set ``image_size``/``mean``/``std`` to the victim's input geometry).
        seed: seed of the evolutionary search.
        refine_steps: :class:`ILRG`'s class-mean refinement steps (default 6; 0 = none).
    """

    def __init__(
        self,
        with_bias: Literal["ilrg", "bias_counts"] = "ilrg",
        image_size: int = 224,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        stats_path: Optional[str] = None,
        aux_source: str = "photographs",
        seed: int = 0,
        refine_steps: int = 6,
    ) -> None:
        if refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
        self.refine_steps = int(refine_steps)
        if with_bias not in ("ilrg", "bias_counts"):
            raise ValueError(f"with_bias must be 'ilrg' or 'bias_counts', got {with_bias!r}")
        self.with_bias = with_bias
        self.evolutionary = EvolutionaryLabelCounts(
            stats_path=stats_path, seed=seed, aux_source=aux_source, image_size=image_size, mean=mean, std=std
        )
        self.chosen: Optional[LabelStrategy] = None
        self.chosen_name: Optional[str] = None

    def select(self, observation: GradientObservation, model: nn.Module) -> tuple[str, LabelStrategy, str]:
        """(name, strategy, reason) for this observation and victim, before any fallback."""
        weight, bias = classifier_gradients(observation, model)  # raises for a non-linear last layer
        if bias is not None:
            if self.with_bias == "ilrg":
                return "ilrg", ILRG(refine_steps=self.refine_steps), "the last linear layer has a bias"
            return "bias_counts", BiasCounts(), "the last linear layer has a bias"
        if observation.batch_size > 1:
            return "evolutionary", self.evolutionary, "no bias in the last linear layer, batch > 1"
        return "idlg", IDLGLabels(), "no bias in the last linear layer, batch of one"

    def _fallback(self, observation: GradientObservation, model: nn.Module) -> tuple[str, LabelStrategy]:
        weight, _ = classifier_gradients(observation, model)
        if observation.batch_size <= weight.shape[0]:
            return "idlg", IDLGLabels()
        return "llg", LLG()

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        name, strategy, reason = self.select(observation, model)
        try:
            labels = strategy(observation, model)
        except (ObservationError, ValueError, RuntimeError) as err:
            if name != "evolutionary":
                raise
            reason = f"evolutionary search failed on this victim ({err}); iDLG rule instead"
            name, strategy = self._fallback(observation, model)
            labels = strategy(observation, model)
        self.chosen, self.chosen_name = strategy, name
        log.info("label strategy 'auto' chose %s: %s", name, reason)
        inner = {k: v for k, v in strategy.diagnostics.items() if k != "strategy"}
        self.note(chosen_strategy=name, choice_reason=reason, **inner)
        return labels


#: names usable wherever a label strategy is chosen by name (``label_strategy(name, **kwargs)``);
#: configs may equally give the class path, e.g. ``class_path: lightning_gi.labels.ILRG``.
LABEL_STRATEGIES: dict[str, type[LabelStrategy]] = {
    "auto": AutoLabels,
    "ilrg": ILRG,
    "bias_counts": BiasCounts,
    "llg": LLG,
    "wainakh": WainakhLabels,
    "bias-corrected": BiasCorrectedLabels,
    "yin": YinLabels,
    "idlg": IDLGLabels,
    "evolutionary": EvolutionaryLabelCounts,
    "coarse": CoarseLabelCounts,
    "shared": SharedLabels,
}


def label_strategy(name: str, **kwargs) -> LabelStrategy:
    """Build a strategy by registry name (see :data:`LABEL_STRATEGIES`)."""
    if name not in LABEL_STRATEGIES:
        raise ValueError(f"unknown label strategy {name!r}; valid names: {', '.join(LABEL_STRATEGIES)}")
    return LABEL_STRATEGIES[name](**kwargs)
