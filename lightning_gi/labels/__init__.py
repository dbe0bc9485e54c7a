"""Label recovery strategies: (observation, victim model) -> LongTensor of labels."""
from .base import LabelStrategy, classifier_gradients, classifier_layer_index
from .idlg import IDLGLabels, SharedLabels, idlg_label, negative_row_labels
from .evolutionary import CoarseLabelCounts, EvolutionaryLabelCounts, coarse_labels, evolutionary_counts
from .auxiliary_stats import AuxiliaryStats, auxiliary_stats_for_model, load_auxiliary_stats, save_auxiliary_stats

__all__ = [
    "LabelStrategy",
    "IDLGLabels",
    "SharedLabels",
    "classifier_gradients",
    "classifier_layer_index",
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
]
