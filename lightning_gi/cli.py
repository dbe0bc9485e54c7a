"""``lightning-gi``: the LightningCLI entry point (``lightning-gi fit --config configs/X.yaml``).

``model:`` selects the attack (any :class:`GradientInversionAttack` subclass by class_path) and
``data:`` the victim (any :class:`VictimDataModule` subclass). The CLI always attaches
:class:`ReconstructionReport` (outputs + metrics), :class:`ReconstructionMonitor` (TensorBoard grids)
and :class:`DivergenceGuard` (NaN/inf recovery) unless the config lists its own instances, logs the
config as TensorBoard hparams, and prints where the outputs are at the end.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from .attacks.base import GradientInversionAttack
from .callbacks import DivergenceGuard, ReconstructionMonitor, ReconstructionReport
from .victim.datamodule import VictimDataModule

_QUIET_WARNINGS = (
    r".*does not have many workers.*",
    r".*is in `eval` mode.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*IterableDataset.*has `__len__`.*",
    r".*Your `IterableDataset` has `__len__` defined.*",
)


def _flatten(prefix: str, value: object, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)


class SaveConfigAndHparams(SaveConfigCallback):
    """Saves config.yaml in the run directory and logs the flattened config as TensorBoard hparams."""

    def save_config(self, trainer, pl_module, stage) -> None:  # type: ignore[no-untyped-def]
        flat: dict[str, str] = {}
        _flatten("", self.config.as_dict(), flat)
        for logger in trainer.loggers:
            logger.log_hyperparams({k: v for k, v in flat.items() if not k.startswith("trainer.callbacks")})


class LightningGICLI(LightningCLI):
    """LightningCLI with the attack/victim base classes and the mandatory output callbacks."""

    def before_fit(self) -> None:
        callbacks = self.trainer.callbacks
        if not any(isinstance(c, ReconstructionReport) for c in callbacks):
            callbacks.append(ReconstructionReport())
        if not any(isinstance(c, ReconstructionMonitor) for c in callbacks):
            callbacks.append(ReconstructionMonitor())
        if not any(isinstance(c, DivergenceGuard) for c in callbacks):
            callbacks.append(DivergenceGuard())

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a collective (broadcast) under multi-process strategies: every rank asks
        if self.trainer.is_global_zero:
            print(f"log_dir: {log_dir}", flush=True)


def quiet_known_warnings() -> None:
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def run(args: Optional[list[str]] = None) -> LightningGICLI:
    """Run the CLI programmatically (``run(["fit", "--config", ...])``) and return it (``.trainer``, ``.model``)."""
    quiet_known_warnings()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return LightningGICLI(
        GradientInversionAttack,
        VictimDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=SaveConfigAndHparams,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point (``lightning-gi``); returns None so that ``sys.exit(main())`` exits with 0."""
    run(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
