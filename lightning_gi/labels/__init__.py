"""Label recovery strategies: (observation, victim model) -> LongTensor of labels.

Every strategy leaves ``strategy.diagnostics`` (a JSON-serialisable dict) after each call; ``AutoLabels``
(``auto``) is the recommended default. See docs/labels.md.
"""
from .base import LabelStrategy, classifier_gradients, classifier_layer_index, last_linear
from .idlg import IDLGLabels, SharedLabels, idlg_label, negative_row_labels
from .evolutionary import CoarseLabelCounts, EvolutionaryLabelCounts, coarse_labels, evolutionary_counts
from .auxiliary_stats import AuxiliaryStats, auxiliary_stats_for_model, load_auxiliary_stats, save_auxiliary_stats
from .counting import ILRG, BiasCounts, round_counts
from .calibrated import CalibratedCounts, class_mean_softmax
from .heuristics import LLG, BiasCorrectedLabels, WainakhLabels, YinLabels, greedy_impact_labels
from .auto import LABEL_STRATEGIES, AutoLabels, label_strategy

__all__ = [
    "LabelStrategy",
    "IDLGLabels",
    "SharedLabels",
    "classifier_gradients",
    "classifier_layer_index",
    "last_linear",
    "idlg_label",
    "negative_row_labels",
    "EvolutionaryLabelCounts",
    "CoarseLabelCounts",
    "coarse_labels",
    "evolutionary_counts",
    "AuxiliaryStats",
    "auxiliary_stats_for_model",
    "load_auxiliary_stats",
    "save_auxiliary_stats",
    "BiasCounts",
    "ILRG",
    "round_counts",
    "CalibratedCounts",
    "class_mean_softmax",
    "LLG",
    "WainakhLabels",
    "BiasCorrectedLabels",
    "YinLabels",
    "greedy_impact_labels",
    "AutoLabels",
    "LABEL_STRATEGIES",
    "label_strategy",
]
