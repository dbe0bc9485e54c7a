"""Label recovery strategies: (observation, victim model) -> LongTensor of labels."""
from .base import LabelStrategy, classifier_gradients, classifier_layer_index
from .idlg import IDLGLabels, SharedLabels, idlg_label, negative_row_labels

__all__ = [
    "LabelStrategy",
    "IDLGLabels",
    "SharedLabels",
    "classifier_gradients",
    "classifier_layer_index",
    "idlg_label",
    "negative_row_labels",
]
