"""Defenses applied by the client to what it shares (a list of gradient tensors).

A defense is a callable ``list[Tensor] -> list[Tensor]`` with a typed constructor so configs can list
them in order (``defenses: [{class_path: ...GaussianNoise, init_args: {std: 0.01}}]``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class Defense:
    """Base class: transform the shared gradient list. Randomness comes from an explicit seed."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = seed

    def _generator(self) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed)
        return g

    def apply(self, gradients: list[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        raise NotImplementedError

    def __call__(self, gradients: list[Tensor]) -> list[Tensor]:
        return self.apply([g.detach() for g in gradients], self._generator())


class GaussianNoise(Defense):
    """Additive Gaussian noise N(0, std^2) on every shared entry (DLG's noise defense, Sec. 5)."""

    def __init__(self, std: float = 1e-2, seed: Optional[int] = None) -> None:
        super().__init__(seed)
        if not std >= 0:
            raise ValueError(f"GaussianNoise std must be >= 0, got {std}")
        self.std = float(std)

    def apply(self, gradients: list[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
        return [
            g + self.std * torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device) for g in gradients
        ]
