"""DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020): squared-L2 gradient matching with L-BFGS.

DLG optimises the dummy image and dummy label logits jointly (soft-label cross-entropy,
softmax of the logits); iDLG first reads the label off the last layer's weight gradient and then
optimises the image only, with the hard-label cross-entropy. Both: L-BFGS (lr 1, 20 inner iterations,
history 100), 300 steps, dummies drawn from N(0, 1). ``steps_per_call`` and ``compile``: see
:class:`~lightning_gi.attacks.base.GradientInversionAttack` (L-BFGS iterates are the same for any value).
"""
from __future__ import annotations

from typing import Optional

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..labels import IDLGLabels, LabelStrategy
from ..objectives.distances import squared_l2
from .base import GradientInversionAttack, _default_lbfgs


class DLG(GradientInversionAttack):
    """Deep Leakage from Gradients: images and label logits are both unknowns (Zhu et al. 2019, Alg. 1)."""

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_lbfgs,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        init: str = "randn",
        seed: int = 0,
        steps_per_call: int = 1,
        compile: bool = False,
    ) -> None:
        super().__init__(
            optimizer, lr_scheduler, label_strategy=None, init=init, seed=seed, distance=squared_l2,
            steps_per_call=steps_per_call, compile=compile,
        )

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
    """Improved DLG: labels from the gradient first (:class:`IDLGLabels`), then the image alone."""

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_lbfgs,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        label_strategy: Optional[LabelStrategy] = None,
        init: str = "randn",
        seed: int = 0,
        steps_per_call: int = 1,
        compile: bool = False,
    ) -> None:
        super().__init__(
            optimizer,
            lr_scheduler,
            label_strategy=label_strategy if label_strategy is not None else IDLGLabels(),
            init=init,
            seed=seed,
            distance=squared_l2,
            steps_per_call=steps_per_call,
            compile=compile,
        )
