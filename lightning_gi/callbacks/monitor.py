"""Views of a running attack through Lightning's logger API: PSNR/SSIM of the current iterate, best
matching distance, learning rate and prior weights as scalars (``logger.log_metrics``: TensorBoard, CSV,
any logger), image grids and labels as text where the logger supports them (TensorBoard), the attack's
and victim's hyperparameters (``log_hyperparams``, with the final figures as ``hp/*`` metrics written by
:class:`ReconstructionReport`). PSNR also shows in the progress bar. The final state is always logged
at the end, also for runs shorter than ``every_n_steps``."""
from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from ..metrics import match_reconstructions, per_image_scores
from .loggers import log_image, log_run_hyperparameters, log_scalars, log_text
from .report import comparison_grid


class ReconstructionMonitor(pl.Callback):
    """Every ``every_n_steps`` optimiser steps and at the end: log ground truth | current reconstruction
    as an image grid, PSNR/SSIM of the current iterate when the ground truth is known, the best matching
    distance, learning rates and prior weights (rank 0 only).

    Args:
        every_n_steps: logging period in optimiser steps.
        max_images: at most this many images in a grid.
        log_hyperparameters: log the attack's/victim's hyperparameters at the start (``log_hyperparams``).
    """

    def __init__(self, every_n_steps: int = 25, max_images: int = 16, log_hyperparameters: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        if max_images < 1:
            raise ValueError("max_images must be >= 1")
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self.log_hyperparameters = log_hyperparameters
        self.last_psnr: Optional[float] = None
        self.last_logged_step: Optional[int] = None
        self._warned_non_finite = False

    def _ground_truth(self, trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule
        return dm.ground_truth() if dm is not None and hasattr(dm, "ground_truth") else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Log the hyperparameters before Lightning's own (empty) ``log_hyperparams`` call, which would
        otherwise fix TensorBoard's HParams tab to no keys and ``hp_metric = -1``."""
        if stage == "fit" and self.log_hyperparameters and trainer.loggers:
            for logger in trainer.loggers:
                if hasattr(logger, "_default_hp_metric"):  # TensorBoardLogger: no placeholder hp_metric = -1
                    logger._default_hp_metric = False
            log_run_hyperparameters(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_logged_step = None
        if not trainer.loggers:
            return
        labels = getattr(pl_module, "labels", None)
        if labels is not None and trainer.is_global_zero:
            gt = self._ground_truth(trainer)
            true = "" if gt is None or gt.labels is None else f"true {sorted(gt.labels.tolist())} | "
            log_text(trainer, "recovered_labels", f"{true}recovered {sorted(labels.tolist())} (sorted)", trainer.global_step)
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)
            if self.last_psnr is not None:  # shown in the progress bar beside the matching distance
                trainer.progress_bar_metrics["psnr"] = round(self.last_psnr, 2)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The final state, also when the run was shorter than ``every_n_steps``."""
        if self.last_logged_step != trainer.global_step:
            self._log(trainer, pl_module)

    @torch.no_grad()
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sharded = bool(getattr(pl_module, "batch_sharded", False))  # gi_shard: every rank joins the gather
        if not trainer.loggers or not (trainer.is_global_zero or sharded):
            return
        current = pl_module.dummy_batch()[0].detach()
        if sharded:
            current = pl_module.gather_batch(current)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        self.last_logged_step = step
        images = pl_module.inputs.to_image_space(current).float().cpu()
        scalars: dict[str, float] = {"best_matching_distance": float(pl_module.best_loss)}
        for i, opt in enumerate(trainer.optimizers):
            scalars[f"lr/optimizer_{i}"] = float(opt.param_groups[0]["lr"])
        for prior in getattr(pl_module, "priors", []):
            scalars[f"prior_weight/{type(prior).__name__}"] = float(getattr(prior, "weight", 0.0))
        k = self.max_images
        if not bool(torch.isfinite(images).all()):
            # NaN/inf unknowns (a diverged step or a bad checkpoint): the DivergenceGuard deals with them;
            # scoring or drawing them would fail, so only the scalars are logged.
            if not self._warned_non_finite:
                self._warned_non_finite = True
                rank_zero_warn(f"ReconstructionMonitor: the current iterate is not finite at step {step}; not scored.")
            log_scalars(trainer, scalars, step)
            return
        images = images.clamp(0, 1)
        gt = self._ground_truth(trainer)
        if gt is not None and gt.images.shape == images.shape:
            perm = match_reconstructions(images, gt.images)
            scores = per_image_scores(images[perm], gt.images)
            psnr, ssim = float(scores["psnr"].mean()), float(scores["ssim"].mean())
            scalars["quality/psnr"], scalars["quality/ssim"] = psnr, ssim
            self.last_psnr = psnr
            grid = comparison_grid(images[perm][:k], gt.images[:k])
        else:
            grid = comparison_grid(images[:k])
        log_scalars(trainer, scalars, step)
        log_image(trainer, "reconstruction", grid, step)
