"""DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020): squared-L2 gradient matching with L-BFGS.

DLG optimises the dummy image and dummy label logits jointly (soft-label cross-entropy,
softmax of the logits); iDLG first reads the label off the last layer's weight gradient and then
optimises the image only, with the hard-label cross-entropy. Both: L-BFGS (lr 1, 20 inner iterations,
history 100), 300 steps, dummies drawn from N(0, 1). ``steps_per_call`` and ``compile``: see
:class:`~lightning_gi.attacks.base.GradientInversionAttack` (L-BFGS iterates are the same for any value).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..labels import IDLGLabels, LabelStrategy
from .base import GradientInversionAttack


class DLG(GradientInversionAttack):
    """Deep Leakage from Gradients: images and label logits are both unknowns (Zhu et al. 2019, Alg. 1).

    Arguments: those of :class:`~lightning_gi.attacks.base.GradientInversionAttack` (L-BFGS, N(0, 1) dummies and
    the squared-L2 distance are its defaults, DLG's settings); no label strategy, the labels are optimised."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("label_strategy") is not None:
            raise ValueError("DLG optimises the labels jointly with the images: use IDLG (or another attack) for a label_strategy")
        kwargs.pop("label_strategy", None)
        super().__init__(**kwargs)

    def create_unknowns(self, generator: torch.Generator) -> None:
        super().create_unknowns(generator)
        logits = torch.randn(self.batch_size, self.inputs.num_classes, generator=generator)[self.local_slice]
        self.dummy_label_logits = nn.Parameter(logits)
        self.register_buffer("best_label_logits", logits.clone())

    def current_targets(self) -> Tensor:
        return torch.softmax(self.dummy_label_logits, dim=-1)

    def best_state(self) -> dict[str, Tensor]:
        return {"label_logits": self.dummy_label_logits}

    def best_labels(self) -> Tensor:
        return self.best_label_logits.argmax(dim=-1)


class IDLG(GradientInversionAttack):
    """Improved DLG: labels from the gradient first (:class:`IDLGLabels` unless ``label_strategy`` says otherwise),
    then the image alone. Other arguments: those of :class:`~lightning_gi.attacks.base.GradientInversionAttack`."""

    def __init__(self, label_strategy: Optional[LabelStrategy] = None, **kwargs: Any) -> None:
        super().__init__(label_strategy=label_strategy if label_strategy is not None else IDLGLabels(), **kwargs)
