"""The default label strategy (``auto``) and the name registry of every strategy.

``AutoLabels`` picks, from what the victim's last layer offers:

1. a bias in the last linear layer and a victim that is NOT confident on the batch ->
   :class:`~lightning_gi.labels.counting.ILRG` with 6 refinement steps (or
   :class:`~lightning_gi.labels.counting.BiasCounts` with ``with_bias="bias_counts"``): counts from the
   bias gradient, exact at large batch while the victim is untrained or early in training;
2. a bias, one gradient of the whole batch (FedSGD), batch >= ``confident_min_batch`` (8), at most a
   quarter of the head's classes with a negative bias gradient, and a CONFIDENT victim (chance-corrected
   :func:`bias_gradient_confidence` above ``confident_above``, default 0.7) -> the evolutionary CV search of Ye et al.
   (:class:`EvolutionaryLabelCounts`); if it cannot run on this victim, breaching's bias-corrected LLG
   (:class:`BiasCorrectedLabels`).
   Measured (docs/labels.md, ``benchmarks/results/labels.json``): on victims that give their samples'
   own classes 0.7 or more of the probability, ILRG's count system is ill-conditioned (a count's row
   carries the factor ``1 - p``; an error of 0.01 in the estimated class probabilities moves counts by
   whole samples) and it falls 20-50% BEHIND the evolutionary search; on untrained and early victims
   (p_true <= 0.1) ILRG is far ahead. No strategy is exact in the confident regime, so a ``warning`` is
   noted there (the run report prints it);
3. no bias, batch > 1 -> the evolutionary search;
4. batch of one, or the evolutionary search cannot run on this victim (e.g. its public statistics do
   not fit the input geometry) -> the iDLG rule (negative rows; :class:`LLG` when batch > classes).

With labelled public images (``public_path``, or :meth:`AutoLabels.use_public_images`) and one FedSGD gradient
without defenses, rules 1-4 give way to a REHEARSAL (:mod:`~lightning_gi.labels.rehearsal`): batches with the
class counts of a first estimate (:class:`CalibratedCounts`; LLG without a bias) are built from public images,
their gradients computed on the victim, and the candidate that recovers them best is used: ILRG,
:class:`CalibratedCounts` (measured on the public images outside the rehearsal batch), the evolutionary
search, bias-corrected LLG, LLG, and the average of the calibrated and evolutionary counts (:data:`BLENDS`)
(those that run on this head). Its measured error is noted (``rehearsal_labels_off``) and becomes the
``warning`` when it is 5% of the batch or more.

The choice is kept in :attr:`AutoLabels.chosen_name` / :attr:`AutoLabels.chosen`, in
``diagnostics["chosen_strategy"]`` / ``diagnostics["choice_reason"]``, and logged (logger
``lightning_gi.labels``, level INFO).
"""
from __future__ import annotations

import logging
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ..observation import GradientObservation, ObservationError
from .base import LabelStrategy, classifier_gradients, last_linear, loss_scale
from .calibrated import CalibratedCounts
from .counting import ILRG, BiasCounts
from .evolutionary import CoarseLabelCounts, EvolutionaryLabelCounts
from .heuristics import LLG, BiasCorrectedLabels, WainakhLabels, YinLabels
from .idlg import IDLGLabels, SharedLabels
from .rehearsal import average_counts, rehearse

log = logging.getLogger("lightning_gi.labels")

#: averages of two rules' counts that the rehearsal also scores (biased heads): on confident victims the calibrated
#: system and the evolutionary search err differently, and their mean measured better than either at mid-size
#: batches (docs/labels.md)
BLENDS: dict[str, tuple[str, ...]] = {"calibrated+evolutionary": ("calibrated", "evolutionary")}

__all__ = ["AutoLabels", "LABEL_STRATEGIES", "label_strategy", "bias_gradient_confidence"]


def bias_gradient_confidence(bias_gradient: Tensor, batch_size: int, num_present: Optional[int] = None) -> Optional[float]:
    """How confident the victim is on the batch, read off the bias gradient (docs/labels.md, Eq. 3).

    ``G_b[c] = S_c - n_c`` for the summed loss (Eq. 1). A class is negative only if it is present and the
    batch gives it less mass than its count, so ``sum_c max(-G_b[c], 0)`` is about ``N - sum_{present c} S_c``
    and ``raw = 1 - sum_c max(-G_b[c], 0) / N`` is about the batch-mean probability the victim puts on the
    batch's own classes. A victim that ignores its input puts ``k / C`` there by chance when ``k`` of the
    ``C`` classes are present, so with ``num_present = k`` this returns the chance-corrected
    ``(raw - k/C) / (1 - k/C)`` (clipped at 0): ~0 for an untrained victim, -> 1 once it has learned the
    batch's classes; None when every class is present (the bias gradient cannot tell the two apart then).
    No ground truth involved.
    """
    g = bias_gradient.detach().double().reshape(-1)
    raw = 1.0 - float(g.clamp_max(0.0).neg().sum()) / max(1, int(batch_size))
    if num_present is None:
        return raw
    chance = int(num_present) / g.numel()
    if chance >= 1.0:
        return None
    return max(0.0, (raw - chance) / (1.0 - chance))


class AutoLabels(LabelStrategy):
    """``auto``: ILRG/BiasCounts with a biased head, else the evolutionary search, else the iDLG rule.

    Args:
        with_bias: strategy for a biased head: "ilrg" (default; robust to non-uniform predictions) or
            "bias_counts" (uniform-probability estimate).
        image_size, mean, std, stats_path, aux_source: passed to :class:`EvolutionaryLabelCounts` for a
            head without bias (set ``image_size``/``mean``/``std`` to the victim's input geometry).
        seed: seed of the evolutionary search.
        refine_steps: :class:`ILRG`'s class-mean refinement steps (default 6; 0 = none).
        confident_above: above this chance-corrected :func:`bias_gradient_confidence` a biased head is read
            by the evolutionary search instead of ILRG (module docs, rule 2), and a warning is noted; 1.0 =
            always ILRG.
        confident_min_batch: the switch is only made from this batch size on (below it the estimate rests on
            too few samples).
        public_path: labelled public images of the victim's classes (a ``.pt`` dict as for
            :class:`CalibratedCounts`, normalised with ``mean``/``std``): the strategy is then chosen by rehearsal
            (module docs). None (default): rules 1-4.
        rehearsals: rehearsal batches (each class's images in a batch come from at most a quarter of its public
            images; CalibratedCounts is measured on the rest).
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
        confident_above: float = 0.7,
        confident_min_batch: int = 8,
        public_path: Optional[str] = None,
        rehearsals: int = 8,
    ) -> None:
        if rehearsals < 1:
            raise ValueError(f"rehearsals must be >= 1, got {rehearsals}")
        self.rehearsals, self.seed = int(rehearsals), int(seed)
        self.public: Optional[CalibratedCounts] = (
            None if public_path is None else CalibratedCounts(public_path=public_path, mean=mean, std=std))
        self._mean, self._std = mean, std
        if confident_min_batch < 2:
            raise ValueError(f"confident_min_batch must be >= 2, got {confident_min_batch}")
        self.confident_min_batch = int(confident_min_batch)
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
        """(name, strategy, reason) for this observation and victim by the head alone (rules 1, 3, 4)."""
        weight, bias = classifier_gradients(observation, model)  # raises for a non-linear last layer
        if bias is not None:
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

    def confidence(self, observation: GradientObservation, model: nn.Module) -> Optional[float]:
        """Chance-corrected :func:`bias_gradient_confidence`, ``k`` = the classes with a negative bias gradient
        (present and under-predicted); None where it is not validated: no bias, batch of one, several clients or
        local steps, or ``k`` above a quarter of the head (then an untrained victim's chance mass on the batch's
        classes, and a marginal it has learned, look like confidence)."""
        from ..client import ThreatModel

        _, bias = classifier_gradients(observation, model)
        n = observation.batch_size
        if bias is None or n < 2:
            return None
        try:
            single = ThreatModel.from_metadata(observation.metadata, n).is_single_gradient
        except ValueError:
            single = False
        g = bias.detach().double().reshape(-1) * loss_scale(observation)
        k = int((g < 0).sum())
        if not single or k > 0.25 * g.numel():
            return None
        return bias_gradient_confidence(g, n, k)

    def _run(self, name: str, strategy: LabelStrategy, reason: str, observation: GradientObservation,
             model: nn.Module) -> tuple[str, LabelStrategy, str, Tensor]:
        """Run the chosen strategy; an evolutionary search that cannot run on this victim falls back (:meth:`_fallback`)."""
        try:
            return name, strategy, reason, strategy(observation, model)
        except (ObservationError, ValueError, RuntimeError) as err:
            if name != "evolutionary":
                raise
            name, strategy = self._fallback(observation, model)
            reason = f"{reason}; the evolutionary search failed on this victim ({err}); {name} instead"
            return name, strategy, reason, strategy(observation, model)

    def use_public_images(self, images: Tensor, labels: Tensor) -> "AutoLabels":
        """Labelled public images ([M, C, H, W] in [0, 1], [M]) already in memory, in place of ``public_path``."""
        self.public = CalibratedCounts.from_tensors(images, labels, mean=self._mean, std=self._std)
        return self

    def adopt_input_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The public images get the attack's input normalisation when ``mean``/``std`` were not given."""
        if self._mean is None:
            self._mean, self._std = list(mean), list(std)
            if self.public is not None:
                self.public.adopt_input_normalisation(mean, std)

    def rehearsal_skipped(self, observation: GradientObservation) -> Optional[str]:
        """Why the rehearsal does not apply to this observation (None: it does). It models one FedSGD gradient
        of an undefended client."""
        from ..client import ThreatModel

        if self.public is None:
            return "no public images"
        if observation.batch_size < 2:
            return "batch of one"
        try:
            single = ThreatModel.from_metadata(observation.metadata, observation.batch_size).is_single_gradient
        except ValueError:
            single = False
        if not single:
            return "the update is not one FedSGD gradient"
        if observation.metadata.get("defenses"):
            return "the update was defended"
        return None

    def _candidates(self, with_bias: bool, measure: Optional[Tensor]) -> dict[str, LabelStrategy]:
        """The rehearsal's candidates (CalibratedCounts measured where ``measure`` is true; None: on all public images)."""
        if not with_bias:
            return {"evolutionary": self.evolutionary, "llg": LLG()}
        assert self.public is not None
        calibrated = self.public if measure is None else self.public.held_out(measure)
        return {"ilrg": ILRG(refine_steps=self.refine_steps), "calibrated": calibrated, "evolutionary": self.evolutionary,
                "bias-corrected": BiasCorrectedLabels(), "llg": LLG()}

    def rehearsal_choice(self, observation: GradientObservation, model: nn.Module) -> tuple[str, dict[str, Optional[float]]]:
        """(the best candidate's name, mean labels off of every candidate) on rehearsal batches with the class
        counts of a first estimate (CalibratedCounts with a biased head, else LLG)."""
        assert self.public is not None
        _, bias = classifier_gradients(observation, model)
        first = (self.public if bias is not None else LLG())(observation, model)
        counts = {int(c): int(n) for c, n in zip(*torch.unique(first, return_counts=True))}
        images, labels = self.public.public_images()
        scores = rehearse(lambda measure: self._candidates(bias is not None, measure), model,
                          self.public.victim_inputs(images), labels, counts, self.rehearsals, seed=self.seed,
                          blends=BLENDS if bias is not None else {})
        valid = {name: v for name, v in scores.items() if v is not None}
        if not valid:
            raise ValueError("no label strategy ran on the rehearsal batches of this victim")
        return min(valid, key=valid.get), scores  # ties: the first candidate

    def _recover_by_rehearsal(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        assert self.public is not None
        name, scores = self.rehearsal_choice(observation, model)
        candidates = self._candidates(classifier_gradients(observation, model)[1] is not None, None)
        reason = (f"rehearsal on public images ({self.rehearsals} batches of {observation.batch_size}): "
                  + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} failed" for k, v in scores.items())
                  + " labels off")
        if name in BLENDS:  # the average of two rules' counts measured best
            parts = {part: candidates[part](observation, model) for part in BLENDS[name]}
            labels = average_counts(list(parts.values()), int(last_linear(model).out_features))
            inner = {f"{part}_counts": candidates[part].diagnostics.get("counts") for part in parts}
            self.chosen = None
        else:
            labels = candidates[name](observation, model)
            inner = {k: v for k, v in candidates[name].diagnostics.items() if k != "strategy"}
            self.chosen = candidates[name]
        self.chosen_name = name
        log.info("label strategy 'auto' chose %s: %s", name, reason)
        self.note(chosen_strategy=name, choice_reason=reason, rehearsal_labels_off=dict(scores), **inner)
        expected = scores[name]
        if expected is not None and expected >= max(1.0, 0.05 * observation.batch_size):
            self.note(warning=(
                f"in rehearsal on public images the best label rule ({name}) got {expected:.1f} of "
                f"{observation.batch_size} labels wrong on average: expect about as many wrong labels here, so a "
                "reconstruction with these labels can under-report what the update leaks"))
        return labels

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        skipped = self.rehearsal_skipped(observation)
        if skipped is None:
            return self._recover_by_rehearsal(observation, model)
        name, strategy, reason, labels = self._run(*self.select(observation, model), observation, model)
        confidence = self.confidence(observation, model) if name in ("ilrg", "bias_counts") else None
        confident = confidence is not None and confidence > self.confident_above
        if confident and observation.batch_size >= self.confident_min_batch:
            reason = (f"the victim is confident on this batch (bias-gradient confidence {confidence:.2f} > "
                      f"{self.confident_above}): ILRG's count system is ill-conditioned there")
            name, strategy, reason, labels = self._run("evolutionary", self.evolutionary, reason, observation, model)
        self.chosen, self.chosen_name = strategy, name
        log.info("label strategy 'auto' chose %s: %s", name, reason)
        inner = {k: v for k, v in strategy.diagnostics.items() if k != "strategy"}
        extra = {} if confidence is None else {"bias_gradient_confidence": round(confidence, 4)}
        self.note(chosen_strategy=name, choice_reason=reason, **extra, **inner)
        if self.public is not None:
            self.note(rehearsal_skipped=skipped)
        if confident:
            self.note(warning=(
                f"the victim is confident on this batch (bias-gradient confidence {confidence:.2f}): no label-count "
                "rule is reliable there (30-70% of the labels wrong at batch 64 in our benchmarks), so a "
                "reconstruction with these labels can under-report what the update leaks"
            ))
        return labels


#: names usable wherever a label strategy is chosen by name (``label_strategy(name, **kwargs)``);
#: configs may equally give the class path, e.g. ``class_path: lightning_gi.labels.ILRG``.
LABEL_STRATEGIES: dict[str, type[LabelStrategy]] = {
    "auto": AutoLabels,
    "ilrg": ILRG,
    "bias_counts": BiasCounts,
    "calibrated": CalibratedCounts,
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
