"""The default label strategy (``auto``) and the name registry of every strategy.

``AutoLabels`` picks, from what the victim's last layer offers:

1. a bias in the last linear layer and a victim that is NOT confident on the batch ->
   :class:`~lightning_gi.labels.counting.ILRG` with 6 refinement steps (or
   :class:`~lightning_gi.labels.counting.BiasCounts` with ``with_bias="bias_counts"``): counts from the
   bias gradient, exact at large batch while the victim is untrained or early in training;
2. a bias, batch > 1 and a CONFIDENT victim (:func:`bias_gradient_confidence` above ``confident_above``,
   default 0.6) -> the evolutionary CV search of Ye et al. (:class:`EvolutionaryLabelCounts`); if it
   cannot run on this victim, breaching's bias-corrected LLG (:class:`BiasCorrectedLabels`).
   Measured (docs/labels.md, ``benchmarks/results/labels.json``): once the victim gives its samples' own
   classes ~0.6 or more of the probability, ILRG's count system is ill-conditioned (a count's row carries
   the factor ``1 - p``; an error of 0.01 in the estimated class probabilities moves counts by whole
   samples) and it falls BEHIND the evolutionary search and LLG; below that, ILRG is far ahead. No
   strategy is exact in the confident regime;
3. no bias, batch > 1 -> the evolutionary search;
4. batch of one, or the evolutionary search cannot run on this victim (e.g. its public statistics do
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
from .base import LabelStrategy, classifier_gradients, loss_scale
from .counting import ILRG, BiasCounts
from .evolutionary import CoarseLabelCounts, EvolutionaryLabelCounts
from .heuristics import LLG, BiasCorrectedLabels, WainakhLabels, YinLabels
from .idlg import IDLGLabels, SharedLabels

log = logging.getLogger("lightning_gi.labels")

__all__ = ["AutoLabels", "LABEL_STRATEGIES", "label_strategy", "bias_gradient_confidence"]


def bias_gradient_confidence(bias_gradient: Tensor, batch_size: int) -> float:
    """How confident the victim is on the batch, read off the bias gradient: ``1 - sum_c max(-G_b[c], 0) / N``.

    ``G_b[c] = S_c - n_c`` for the summed loss (docs/labels.md, Eq. 1). A class is negative only if it is
    present and the batch gives it less mass than its count, so ``sum_c max(-G_b[c], 0)`` is about
    ``N - sum_{present c} S_c``: one minus this over ``N`` estimates the batch-mean probability the victim
    puts on the batch's own classes (about ``p_true``; ~1/C-ish for an untrained victim, -> 1 when it has
    learned the batch's classes). No ground truth involved.
    """
    g = bias_gradient.detach().double().reshape(-1)
    return 1.0 - float(g.clamp_max(0.0).neg().sum()) / max(1, int(batch_size))


class AutoLabels(LabelStrategy):
    """``auto``: ILRG/BiasCounts with a biased head, else the evolutionary search, else the iDLG rule.

    Args:
        with_bias: strategy for a biased head: "ilrg" (default; robust to non-uniform predictions) or
            "bias_counts" (uniform-probability estimate).
        image_size, mean, std, stats_path, aux_source: passed to :class:`EvolutionaryLabelCounts` for a
            head without bias (set ``image_size``/``mean``/``std`` to the victim's input geometry).
        seed: seed of the evolutionary search.
        refine_steps: :class:`ILRG`'s class-mean refinement steps (default 6; 0 = none).
        confident_above: above this :func:`bias_gradient_confidence` (and batch > 1) a biased head is
            read by the evolutionary search instead of ILRG (module docs, rule 2); 1.0 = always ILRG.
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
        confident_above: float = 0.6,
    ) -> None:
        if not 0.0 <= confident_above <= 1.0:
            raise ValueError(f"confident_above must be in [0, 1], got {confident_above}")
        self.confident_above = float(confident_above)
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
            n = observation.batch_size
            confidence = bias_gradient_confidence(bias * loss_scale(observation), n)
            if n > 1 and self.confident_above < 1.0 and confidence > self.confident_above:
                return "evolutionary", self.evolutionary, (
                    f"the victim is confident on this batch (bias-gradient confidence {confidence:.2f} > "
                    f"{self.confident_above}): ILRG's count system is ill-conditioned there"
                )
            if self.with_bias == "ilrg":
                return "ilrg", ILRG(refine_steps=self.refine_steps), "the last linear layer has a bias"
            return "bias_counts", BiasCounts(), "the last linear layer has a bias"
        if observation.batch_size > 1:
            return "evolutionary", self.evolutionary, "no bias in the last linear layer, batch > 1"
        return "idlg", IDLGLabels(), "no bias in the last linear layer, batch of one"

    def _fallback(self, observation: GradientObservation, model: nn.Module) -> tuple[str, LabelStrategy]:
        weight, bias = classifier_gradients(observation, model)
        if bias is not None:
            return "bias-corrected", BiasCorrectedLabels()
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
            name, strategy = self._fallback(observation, model)
            reason = f"{reason}; the evolutionary search failed on this victim ({err}); {name} instead"
            labels = strategy(observation, model)
        self.chosen, self.chosen_name = strategy, name
        log.info("label strategy 'auto' chose %s: %s", name, reason)
        inner = {k: v for k, v in strategy.diagnostics.items() if k != "strategy"}
        _, bias = classifier_gradients(observation, model)
        extra = {} if bias is None else {
            "bias_gradient_confidence": round(bias_gradient_confidence(bias * loss_scale(observation), observation.batch_size), 4)
        }
        self.note(chosen_strategy=name, choice_reason=reason, **extra, **inner)
        confidence = extra.get("bias_gradient_confidence")
        if confidence is not None and observation.batch_size > 1 and confidence > self.confident_above:
            self.note(warning=(
                f"the victim is confident on this batch (bias-gradient confidence {confidence:.2f}): no label-count "
                "rule is reliable there (about a third of the labels wrong at batch 64 in our benchmarks), so a "
                "reconstruction with these labels can under-report what the update leaks"
            ))
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
