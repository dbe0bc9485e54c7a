"""Writes what an attack run produces, so nothing is lost when it stops.

In ``trainer.log_dir``: ``reconstruction.pt`` (best iterate so far, every ``save_every_n_steps`` and at
the end, atomic writes), ``reconstruction.png`` (ground truth above the matched reconstruction) and,
when the ground truth is known, ``metrics.json`` (MSE/PSNR/SSIM/LPIPS/label accuracy after a one-to-one
assignment, plus per-image values). Only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torchvision.utils import make_grid, save_image

from ..metrics import load_lpips, lpips_unavailable_reason, match_reconstructions, reconstruction_metrics
from ..observation import save_atomic


def run_dir(trainer: pl.Trainer) -> str:
    path = trainer.log_dir or trainer.default_root_dir
    os.makedirs(path, exist_ok=True)
    return path


def comparison_grid(reconstructions: Tensor, ground_truth: Optional[Tensor] = None, nrow: int = 16) -> Tensor:
    """Ground truth (when known) above the reconstructions matched to it, as one image [C,H,W]."""
    rec = reconstructions.detach().float().clamp(0, 1).cpu()
    if ground_truth is None:
        return make_grid(rec, nrow=min(nrow, rec.shape[0]), padding=2, pad_value=1.0)
    gt = ground_truth.detach().float().clamp(0, 1).cpu()
    if rec.shape[0] == gt.shape[0] and rec.shape[1:] == gt.shape[1:]:
        rec = rec[match_reconstructions(rec, gt)]
    ncol = min(nrow, gt.shape[0])
    top = make_grid(gt, nrow=ncol, padding=2, pad_value=1.0)
    bottom = make_grid(rec, nrow=ncol, padding=2, pad_value=1.0)
    sep = torch.zeros(top.shape[0], 4, top.shape[2])
    return torch.cat([top, sep, bottom], dim=1)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _sharded(pl_module: pl.LightningModule) -> bool:
    """True when the attack runs split over processes (lightning_gi.distributed): gathers are collective."""
    return getattr(pl_module, "shard", None) is not None


class ReconstructionReport(pl.Callback):
    """Saves the best reconstruction periodically and, at the end, the image grid and metrics.

    Args:
        save_every_n_steps: also write ``reconstruction.pt`` every this many optimiser steps (0: only at the end).
        lpips_net: LPIPS backbone ("alex", "vgg", "squeeze"); used only when its weights are on disk.
    """

    def __init__(self, save_every_n_steps: int = 100, lpips_net: str = "alex") -> None:
        if save_every_n_steps < 0:
            raise ValueError("save_every_n_steps must be >= 0")
        self.save_every_n_steps = save_every_n_steps
        self.lpips_net = lpips_net
        self.metrics: Optional[dict[str, Any]] = None
        self.output_dir: Optional[str] = None

    def _save_reconstruction(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        # Under a gi_shard/gi_restarts strategy every rank takes part in the gather; only rank 0 writes.
        gather = getattr(pl_module, "gathered_reconstruction", None)
        rec = gather() if gather is not None else pl_module.reconstruction()
        rec["step"] = int(trainer.global_step)
        path = os.path.join(run_dir(trainer), "reconstruction.pt")  # trainer.log_dir broadcasts: all callers
        if trainer.is_global_zero:
            save_atomic(rec, path)
        return rec

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.save_every_n_steps and step % self.save_every_n_steps == 0 and (trainer.is_global_zero or _sharded(pl_module)):
            self._save_reconstruction(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _sharded(pl_module):
            rec = self._save_reconstruction(trainer, pl_module)  # collective: all ranks
            out = run_dir(trainer)  # trainer.log_dir is a collective (broadcast) too
        if not trainer.is_global_zero:
            return
        if not _sharded(pl_module):
            out = run_dir(trainer)
        self.output_dir = out
        if not _sharded(pl_module):
            rec = self._save_reconstruction(trainer, pl_module)
        dm = trainer.datamodule
        gt = dm.ground_truth() if dm is not None and hasattr(dm, "ground_truth") else None
        save_image(comparison_grid(rec["images"], None if gt is None else gt.images), os.path.join(out, "reconstruction.png"))
        lines = [f"lightning_gi: outputs in {out}", f"  reconstruction.pt, reconstruction.png (best matching distance {rec['matching_distance']:.4g})"]
        if gt is not None:
            lpips_model = load_lpips(self.lpips_net)
            note = None if lpips_model is not None else lpips_unavailable_reason(self.lpips_net)
            metrics = reconstruction_metrics(rec["images"], gt.images, rec["labels"], gt.labels, lpips_model, note)
            metrics.update(
                attack=type(pl_module).__name__,
                steps=int(trainer.global_step),
                matching_distance=rec["matching_distance"],
                recovered_labels=rec["labels"].tolist(),
                true_labels=gt.labels.tolist(),
            )
            self.metrics = metrics
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump(_json_safe(metrics), f, indent=2)
            lp = "n/a" if metrics["lpips"] is None else f"{metrics['lpips']:.3f}"
            acc = metrics["label_accuracy"]
            lines.append(
                f"  metrics.json: MSE {metrics['mse']:.4g}  PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.3f}  "
                f"LPIPS {lp}  label accuracy {'n/a' if acc is None else f'{acc:.2f}'}"
            )
            if metrics["lpips"] is None:
                lines.append(f"  LPIPS skipped: {metrics['lpips_note']}")
        rank_zero_info("\n".join(lines))
