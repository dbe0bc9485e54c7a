"""The registry of lightning_gi's Trainer strategies (``gi_shard``, ``gi_restarts``, ``gi_shard_spawn``).

They are registered with Lightning's ``StrategyRegistry`` when ``lightning_gi`` is imported: at once when
``pytorch_lightning`` is already loaded, else right after ``pytorch_lightning.strategies`` is first imported (a
one-shot import hook), so ``import lightning_gi`` itself stays free of torch. Importing the attacks plays no part.
:func:`register_strategies` does it explicitly (idempotent).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any, Optional, Sequence

__all__ = ["STRATEGY_NAMES", "register_strategies", "register_at_lightning_import"]

STRATEGY_NAMES = ("gi_shard", "gi_restarts", "gi_shard_spawn")
_TRIGGER = "pytorch_lightning.strategies"


def register_strategies() -> None:
    """Register the gi_* strategies with ``pytorch_lightning``'s StrategyRegistry (idempotent)."""
    from .distributed import _register

    _register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Wraps the loader of ``pytorch_lightning.strategies`` so the registration runs right after it executes."""

    def __init__(self) -> None:
        self._loader: Any = None

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        register_strategies()


def register_at_lightning_import() -> None:
    """Register now when Lightning's strategies are loaded, else as soon as they are."""
    if _TRIGGER in sys.modules:
        register_strategies()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
