"""TensorBoard views of a running attack: image grids, PSNR/SSIM over time, learning rate, prior
weights, recovered labels; PSNR also in the progress bar."""
from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from ..metrics import match_reconstructions, per_image_scores
from .report import comparison_grid


def _tensorboard(trainer: pl.Trainer) -> Optional[Any]:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class ReconstructionMonitor(pl.Callback):
    """Every ``every_n_steps`` optimiser steps: log ground truth | current reconstruction as an image
    grid, and PSNR/SSIM of the current iterate when the ground truth is known (rank 0 only).

    Args:
        every_n_steps: logging period in optimiser steps.
        max_images: at most this many images in a grid.
    """

    def __init__(self, every_n_steps: int = 25, max_images: int = 16) -> None:
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self.last_psnr: Optional[float] = None

    def _ground_truth(self, trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule
        return dm.ground_truth() if dm is not None and hasattr(dm, "ground_truth") else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tb = _tensorboard(trainer)
        if tb is None:
            return
        labels = getattr(pl_module, "labels", None)
        if labels is not None and trainer.is_global_zero:
            tb.add_text("recovered_labels", str(labels.tolist()), 0)
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)
            if self.last_psnr is not None:  # shown in the progress bar beside the matching distance
                trainer.progress_bar_metrics["psnr"] = round(self.last_psnr, 2)

    @torch.no_grad()
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tb = _tensorboard(trainer)
        sharded = bool(getattr(pl_module, "batch_sharded", False))  # gi_shard: every rank joins the gather
        if tb is None or not (trainer.is_global_zero or sharded):
            return
        current = pl_module.dummy_batch()[0].detach()
        if sharded:
            current = pl_module.gather_batch(current)
        if not trainer.is_global_zero:
            return
        images = pl_module.inputs.to_image_space(current).clamp(0, 1).float().cpu()
        gt = self._ground_truth(trainer)
        k = self.max_images
        step = trainer.global_step
        if gt is not None and gt.images.shape == images.shape:
            perm = match_reconstructions(images, gt.images)
            scores = per_image_scores(images[perm], gt.images)
            psnr, ssim = float(scores["psnr"].mean()), float(scores["ssim"].mean())
            tb.add_scalar("quality/psnr", psnr, step)
            tb.add_scalar("quality/ssim", ssim, step)
            self.last_psnr = psnr
            grid = comparison_grid(images[perm][:k], gt.images[:k])
        else:
            grid = comparison_grid(images[:k])
        tb.add_image("reconstruction", grid, step)
        tb.add_scalar("best_matching_distance", float(pl_module.best_loss), step)
        for i, opt in enumerate(trainer.optimizers):
            tb.add_scalar(f"lr/optimizer_{i}", float(opt.param_groups[0]["lr"]), step)
        for prior in getattr(pl_module, "priors", []):
            tb.add_scalar(f"prior_weight/{type(prior).__name__}", float(getattr(prior, "weight", 0.0)), step)
