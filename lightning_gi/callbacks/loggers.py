"""Logger-agnostic helpers for the output callbacks: scalars and hyperparameters go through Lightning's
logger API (``log_metrics`` / ``log_hyperparams``), so a CSVLogger, WandbLogger, ... receives them too;
images and text are written only by loggers that have them (TensorBoard), and skipped elsewhere.

The hyperparameters of a run are the attack's and the victim's constructor arguments (not the trainer's
internals), and the final quality figures are logged as hparams metrics under ``hp/*`` so runs can be
ranked in TensorBoard's HParams tab.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Optional

import pytorch_lightning as pl
from torch import Tensor, nn

# Final figures logged as hparams metrics (TensorBoard ranks runs by them); keys of metrics.json.
HPARAM_METRICS: dict[str, str] = {
    "psnr": "hp/psnr",
    "ssim": "hp/ssim",
    "lpips": "hp/lpips",
    "label_accuracy": "hp/label_accuracy",
    "matching_distance": "hp/matching_distance",
}
_SCALAR_TYPES = (bool, int, float, str)


def _tensorboard_writer(logger: Any) -> Optional[Any]:
    """The SummaryWriter of a TensorBoard logger, else None (no import of tensorboard otherwise)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    return logger.experiment if isinstance(logger, TensorBoardLogger) else None


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """``logger.log_metrics`` on every logger of the trainer (rank 0 only); non-finite values are kept."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    values = {k: float(v) for k, v in metrics.items() if v is not None}
    if not values:
        return
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def _to_tensorboard(trainer: pl.Trainer, write: Callable[[Any], None]) -> bool:
    """Call ``write(writer)`` for the SummaryWriter of every TensorBoard logger (rank 0); True if one took it."""
    if not trainer.is_global_zero:
        return False
    writers = [w for w in (_tensorboard_writer(logger) for logger in trainer.loggers) if w is not None]
    for writer in writers:
        write(writer)
    return bool(writers)


def log_image(trainer: pl.Trainer, tag: str, image: Tensor, step: int) -> bool:
    """An image [C,H,W] in [0,1] to every TensorBoard logger (others are skipped); True if one took it."""
    return _to_tensorboard(trainer, lambda writer: writer.add_image(tag, image, step))


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int) -> bool:
    """Text to every TensorBoard logger (others are skipped); True if one took it."""
    return _to_tensorboard(trainer, lambda writer: writer.add_text(tag, text, step))


def _describe(value: Any) -> Any:
    if value is None or isinstance(value, _SCALAR_TYPES):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALAR_TYPES) for v in value) and len(value) <= 16:
        return str(list(value))
    if isinstance(value, Tensor):
        if value.numel() > 16:
            return f"Tensor{tuple(value.shape)}"
        return str(value.flatten().tolist() if not value.is_floating_point() else [round(float(v), 6) for v in value.flatten()])
    if isinstance(value, nn.ModuleList):
        return str([type(m).__name__ for m in value])
    func = getattr(value, "func", None)  # functools.partial (optimizer factories from the CLI)
    if func is not None:
        keywords = getattr(value, "keywords", {}) or {}
        args = ", ".join(f"{k}={v}" for k, v in keywords.items() if isinstance(v, _SCALAR_TYPES))
        return f"{getattr(func, '__name__', type(func).__name__)}({args})"
    return getattr(value, "__name__", None) or type(value).__name__


def constructor_arguments(obj: Any) -> dict[str, Any]:
    """The arguments of ``type(obj).__init__`` that ``obj`` keeps under the same name (or ``<name>_factory``),
    as scalars or short descriptions (class names)."""
    out: dict[str, Any] = {}
    stored = {**vars(obj), **getattr(obj, "_modules", {})}  # plain attributes and submodules, no properties
    for cls in type(obj).__mro__:  # a constructor taking **kwargs forwards them: follow it into its parents
        if "__init__" not in vars(cls) or cls is object:
            continue
        try:
            params = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            break
        for name, param in params.items():
            if name == "self" or name in out or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            for attr in (name, f"{name}_factory"):
                if attr in stored:
                    out[name] = _describe(stored[attr])
                    break
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return out


def run_hyperparameters(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """The attack's and the victim's hyperparameters (``attack/*``, ``victim/*``), not the trainer's.

    Taken from ``pl_module.hparams`` / ``datamodule.hparams`` when they were saved, else from the
    constructor arguments the objects keep; the class names are included.
    """
    hp: dict[str, Any] = {"attack": type(pl_module).__name__}
    attack_args = dict(pl_module.hparams) if len(pl_module.hparams) else constructor_arguments(pl_module)
    hp.update({f"attack/{k}": _describe(v) for k, v in attack_args.items()})
    dm = trainer.datamodule
    if dm is not None:
        hp["victim"] = type(dm).__name__
        dm_args = dict(dm.hparams) if len(getattr(dm, "hparams", {})) else constructor_arguments(dm)
        hp.update({f"victim/{k}": _describe(v) for k, v in dm_args.items()})
    hp["max_steps"] = int(trainer.max_steps)
    return hp


def log_run_hyperparameters(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """``log_hyperparams(attack/victim hyperparameters, hp/* metrics = NaN until the run ends)``."""
    hp = run_hyperparameters(trainer, pl_module)
    if trainer.is_global_zero:
        placeholders = {key: math.nan for key in HPARAM_METRICS.values()}
        for logger in trainer.loggers:
            if _tensorboard_writer(logger) is not None:
                logger.log_hyperparams(hp, placeholders)  # declares the hp/* metrics of the HParams tab
            else:
                logger.log_hyperparams(hp)
    return hp


def log_final_metrics(trainer: pl.Trainer, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
    """The final figures of a run (keys of metrics.json) as the ``hp/*`` hparams metrics, every logger."""
    values = {
        tag: float(metrics[key])
        for key, tag in HPARAM_METRICS.items()
        if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool)
    }
    log_scalars(trainer, values, step)
    return values
