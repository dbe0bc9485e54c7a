"""lightning_gi: gradient inversion attacks as PyTorch Lightning modules.

The public names below are imported on first use, so ``import lightning_gi`` (and ``lightning-gi --help``)
does not pay for torch and Lightning. The Trainer strategies ``gi_shard`` / ``gi_restarts`` / ``gi_shard_spawn``
are registered here, at package import (:mod:`lightning_gi.strategies`: at once when Lightning is loaded, else
when it is).
"""
from __future__ import annotations

import importlib
from typing import Any

from .strategies import register_at_lightning_import as _register_strategies

__version__ = "0.1.0"
_register_strategies()

_LAZY = {
    "GradientObservation": "lightning_gi.observation",
    "ObservationError": "lightning_gi.observation",
    "capture_observation": "lightning_gi.observation",
    "client_gradients": "lightning_gi.observation",
}
__all__ = ["GradientObservation", "ObservationError", "capture_observation", "client_gradients", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
