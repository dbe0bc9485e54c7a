"""Writes what an attack run produces, so nothing is lost when it stops.

In ``trainer.log_dir``: ``reconstruction.pt`` (best iterate so far, every ``save_every_n_steps`` and at
the end, atomic writes: the raw [0,1] tensors), ``reconstruction.png`` (an upscaled, captioned grid: each
ground-truth image above the reconstruction matched to it, with true/recovered label and PSNR/SSIM) and
``metrics.json`` (``status``, steps, matching distance, saturation and, when the ground truth is known,
MSE/PSNR/SSIM/LPIPS and the label figures, plus per-image values). On any stop (Ctrl-C, SIGTERM, an
exception) the best reconstruction so far is written the same way with ``"status": "interrupted"``.
Only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ..metrics import (
    load_lpips,
    lpips_unavailable_reason,
    match_reconstructions,
    reconstruction_metrics,
    saturated_fraction,
    saturation_warning,
)
from ..observation import save_atomic
from .loggers import log_final_metrics, log_text


def run_dir(trainer: pl.Trainer) -> str:
    path = trainer.log_dir or trainer.default_root_dir
    os.makedirs(path, exist_ok=True)
    return path


def comparison_grid(reconstructions: Tensor, ground_truth: Optional[Tensor] = None, nrow: int = 16) -> Tensor:
    """Ground truth (when known) above the reconstructions matched to it, as one image [C,H,W]."""
    from torchvision.utils import make_grid  # imported where used (startup cost)

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
    """Saves the best reconstruction periodically and, at the end or on any stop, the grid and metrics.

    Args:
        save_every_n_steps: also write ``reconstruction.pt`` every this many optimiser steps (0: only at the end).
        lpips_net: LPIPS backbone ("alex", "vgg", "squeeze"); used only when its weights are on disk.
        min_image_px: each image of ``reconstruction.png`` is upscaled (nearest neighbour, integer factor)
            to at least this many pixels on its longer side.
        max_grid_images: at most this many images in ``reconstruction.png`` (all are in the .pt and metrics).
    """

    def __init__(
        self, save_every_n_steps: int = 100, lpips_net: str = "alex", min_image_px: int = 128, max_grid_images: int = 64
    ) -> None:
        if save_every_n_steps < 0:
            raise ValueError("save_every_n_steps must be >= 0")
        if min_image_px < 1 or max_grid_images < 1:
            raise ValueError("min_image_px and max_grid_images must be >= 1")
        self.save_every_n_steps = save_every_n_steps
        self.lpips_net = lpips_net
        self.min_image_px = min_image_px
        self.max_grid_images = max_grid_images
        self.metrics: Optional[dict[str, Any]] = None
        self.output_dir: Optional[str] = None
        self._writing = False
        self._first_distance: Optional[float] = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_distance = None

    def _save_reconstruction(self, trainer: pl.Trainer, pl_module: pl.LightningModule, gather: bool = True) -> dict[str, Any]:
        # Under a gi_shard/gi_restarts strategy every rank takes part in the gather; only rank 0 writes.
        gathered = getattr(pl_module, "gathered_reconstruction", None) if gather else None
        rec = gathered() if gathered is not None else pl_module.reconstruction()
        rec["step"] = int(trainer.global_step)
        path = os.path.join(run_dir(trainer), "reconstruction.pt")  # trainer.log_dir broadcasts: all callers
        if trainer.is_global_zero:
            save_atomic(rec, path)
        return rec

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._first_distance is None and hasattr(pl_module, "best_loss"):
            # the matching distance of the first iterate (one host sync, once): a reference for convergence
            self._first_distance = float(pl_module.best_loss)
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
            rec = self._save_reconstruction(trainer, pl_module)
        self._write_outputs(trainer, pl_module, rec, out, status="finished", reason=None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Any stop (KeyboardInterrupt, SIGTERM, an error): write the best reconstruction so far, its metrics
        and ``"status": "interrupted"``. Never raises (the original exception is what the user must see)."""
        if self._writing or not trainer.is_global_zero or getattr(pl_module, "best_images", None) is None:
            return
        if trainer.global_step == 0:  # stopped before the first step (e.g. a failed start-of-run check): nothing to save
            return
        reason = f"{type(exception).__name__}: {exception}".rstrip(": ")
        if _sharded(pl_module):  # a gather would wait for ranks that may be gone; keep the periodic file
            rank_zero_warn(f"run interrupted ({reason}); multi-process run: only the last periodic reconstruction.pt is kept.")
            return
        try:
            out = run_dir(trainer)
            rec = self._save_reconstruction(trainer, pl_module, gather=False)
            self._write_outputs(trainer, pl_module, rec, out, status="interrupted", reason=reason)
        except Exception as err:  # noqa: BLE001 - reporting must not hide the interruption
            rank_zero_warn(f"run interrupted ({reason}); writing its outputs failed too: {err}")

    def _write_outputs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, rec: dict[str, Any], out: str, status: str,
        reason: Optional[str],
    ) -> None:
        self._writing = True
        try:
            self._write(trainer, pl_module, rec, out, status, reason)
        finally:
            self._writing = False

    def _write(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, rec: dict[str, Any], out: str, status: str,
        reason: Optional[str],
    ) -> None:
        self.output_dir = out
        dm = trainer.datamodule
        gt = dm.ground_truth() if dm is not None and hasattr(dm, "ground_truth") else None
        images: Tensor = rec["images"]
        metrics: dict[str, Any] = {"status": status}
        if reason is not None:
            metrics["stop_reason"] = reason
        metrics.update(
            attack=type(pl_module).__name__,
            steps=int(trainer.global_step),
            max_steps=int(trainer.max_steps),
            matching_distance=rec["matching_distance"],
            recovered_labels=rec["labels"].tolist(),
        )
        strategy = getattr(pl_module, "label_strategy", None)
        diagnostics = getattr(strategy, "diagnostics", None)
        if isinstance(diagnostics, dict) and diagnostics:  # which label rule ran and how well its equations closed
            metrics["label_diagnostics"] = diagnostics
            if diagnostics.get("warning"):  # the rule says its labels are not to be trusted
                metrics["label_warning"] = str(diagnostics["warning"])
        first = self._first_distance
        ratio = rec["matching_distance"] / first if first is not None and math.isfinite(first) and first > 0 else None
        metrics["distance_ratio"] = ratio
        if gt is not None:
            lpips_model = load_lpips(self.lpips_net)
            note = None if lpips_model is not None else lpips_unavailable_reason(self.lpips_net)
            metrics.update(reconstruction_metrics(images, gt.images, rec["labels"], gt.labels, lpips_model, note, ratio))
            metrics["true_labels"] = gt.labels.tolist()
        else:
            metrics.update(
                saturation=saturated_fraction(images), saturation_warning=saturation_warning(images, distance_ratio=ratio)
            )
        self.metrics = metrics
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(_json_safe(metrics), f, indent=2)
        title, captions = grid_captions(metrics, images.shape[0], gt is not None)
        write_captioned_grid(
            os.path.join(out, "reconstruction.png"), images, None if gt is None else gt.images,
            metrics.get("assignment"), captions, title, self.min_image_px, self.max_grid_images,
        )
        log_final_metrics(trainer, metrics, int(trainer.global_step))
        if gt is not None:
            log_text(trainer, "labels", label_text(metrics), int(trainer.global_step))
        if "label_diagnostics" in metrics:  # the label rule's own evidence, for TensorBoard's text tab
            log_text(trainer, "labels/diagnostics", json.dumps(_json_safe(metrics["label_diagnostics"]), indent=1),
                     int(trainer.global_step))
        rank_zero_info("\n".join(self._summary(metrics, out, status, reason)))

    def _summary(self, metrics: dict[str, Any], out: str, status: str, reason: Optional[str]) -> list[str]:
        head = f"lightning_gi: outputs in {out}"
        if status != "finished":
            head += f" (INTERRUPTED at step {metrics['steps']}: {reason}; best reconstruction so far)"
        lines = [head, f"  reconstruction.pt, reconstruction.png (best matching distance {metrics['matching_distance']:.4g})"]
        if "psnr" in metrics:
            lp = "n/a" if metrics["lpips"] is None else f"{metrics['lpips']:.3f}"
            lines.append(
                f"  metrics.json: MSE {metrics['mse']:.4g}  PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.3f}  "
                f"LPIPS {lp}  {label_summary(metrics)}"
            )
            note = metrics.get("lpips_note")
            if metrics["lpips"] is None and note and note not in _NOTES_SHOWN:
                _NOTES_SHOWN.add(note)  # said once per process
                lines.append(f"  {note}")
        else:
            lines.append(f"  metrics.json: status {status}, no ground truth (no quality scores)")
        if metrics.get("saturation_warning"):
            lines.append(f"  WARNING: {metrics['saturation_warning']}")
        if metrics.get("label_warning"):
            lines.append(f"  WARNING (labels): {metrics['label_warning']}")
        return lines


_NOTES_SHOWN: set[str] = set()


def label_summary(metrics: dict[str, Any]) -> str:
    """The headline label figure (multiset), with the per-image pairing figure labelled as such."""
    acc = metrics.get("label_accuracy")
    if acc is None:
        return "labels n/a"
    n = int(metrics["num_images"])
    off = int(metrics["labels_off"])
    return (
        f"labels {n - off}/{n} recovered (accuracy {acc:.2f}, {off} off; "
        f"per-image pairing {metrics['label_accuracy_paired']:.2f})"
    )


def label_text(metrics: dict[str, Any]) -> str:
    """True vs recovered labels as one line of text (TensorBoard's text tab)."""
    return (
        f"true {sorted(metrics.get('true_labels', []))} | recovered {sorted(metrics.get('recovered_labels', []))} "
        f"(sorted) | {label_summary(metrics)}"
    )


def grid_captions(metrics: dict[str, Any], num_reconstructions: int, has_ground_truth: bool) -> tuple[str, list[str]]:
    """(title, one caption per grid column) for :func:`write_captioned_grid`."""
    if not has_ground_truth:
        labels = metrics.get("recovered_labels") or []
        captions = [f"label {labels[i]}" if i < len(labels) else "" for i in range(num_reconstructions)]
        title = f"{metrics.get('attack', '')} step {metrics.get('steps')}  distance {metrics['matching_distance']:.3g}"
    else:
        captions = []
        for p in metrics["per_image"]:
            rec_label = "?" if p["label_reconstructed"] is None else p["label_reconstructed"]
            psnr = p["psnr"]
            psnr_s = "inf" if not math.isfinite(psnr) else f"{psnr:.1f}"
            captions.append(f"true {p['label_true']} | rec {rec_label}\nPSNR {psnr_s} SSIM {p['ssim']:.2f}")
        title = (
            f"{metrics.get('attack', '')} step {metrics.get('steps')}: PSNR {metrics['psnr']:.2f} dB "
            f"SSIM {metrics['ssim']:.3f}  {label_summary(metrics)}"
        )
    if metrics.get("status", "finished") != "finished":
        title = "INTERRUPTED - " + title
    return title, captions


def _upscaled(images: Tensor, factor: int) -> Tensor:
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1) if factor > 1 else x


def write_captioned_grid(
    path: str,
    reconstructions: Tensor,
    ground_truth: Optional[Tensor] = None,
    assignment: Optional[Sequence[int]] = None,
    captions: Optional[Sequence[str]] = None,
    title: str = "",
    min_image_px: int = 128,
    max_images: int = 64,
) -> dict[str, Any]:
    """An upscaled grid PNG: per column the ground-truth image (if known) above the reconstruction
    ``assignment`` pairs with it, nearest-neighbour upscaled by an integer factor to >= ``min_image_px``,
    and a caption below. The title and captions are also stored as PNG text (keys ``title``,
    ``captions``, JSON). Returns the layout: ``scale``, ``cell`` (w, h), ``size``, ``columns``, ``origins``
    (top-left pixel of each column's first image) and ``row_offset`` (from one image row to the next)."""
    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    rec = reconstructions
    if ground_truth is not None and assignment is not None:
        rec = reconstructions[torch.as_tensor(list(assignment), dtype=torch.long)]
    n = min(rec.shape[0], max_images)
    captions = list(captions or [])[:n] + [""] * max(0, n - len(captions or []))
    h, w = int(rec.shape[-2]), int(rec.shape[-1])
    scale = max(1, math.ceil(min_image_px / max(h, w)))
    rows = [_upscaled(rec[:n], scale)]
    if ground_truth is not None:
        rows.insert(0, _upscaled(ground_truth[:n], scale))
    font = ImageFont.load_default()
    line_h = 12
    cap_lines = max([c.count("\n") + 1 for c in captions] + [1])
    pad, cell_w, img_h = 4, w * scale, h * scale
    cell_h = img_h * len(rows) + pad * (len(rows) - 1) + cap_lines * line_h + pad
    ncol = min(n, max(1, 1200 // (cell_w + pad)), 8) if n else 1
    nrow = max(1, math.ceil(n / ncol))
    title_lines = [title] if title else []
    if n < rec.shape[0]:
        title_lines.append(f"first {n} of {rec.shape[0]} images")
    top = pad + line_h * len(title_lines)
    text_w = max([int(font.getlength(t)) for t in title_lines] + [0])
    width = max(pad + ncol * (cell_w + pad), 2 * pad + text_w)
    height = top + pad + nrow * (cell_h + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((pad, pad + k * line_h), line, fill="black", font=font)
    origins = []
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = pad + c * (cell_w + pad), top + pad + r * (cell_h + pad)
        origins.append((x0, y0))
        for j, row in enumerate(rows):
            arr = (row[i].permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype("uint8")
            canvas.paste(Image.fromarray(arr), (x0, y0 + j * (img_h + pad)))
        ty = y0 + len(rows) * (img_h + pad) - pad + 2
        for k, line in enumerate(captions[i].split("\n")):
            draw.text((x0, ty + k * line_h), line, fill="black", font=font)
    info = PngInfo()
    info.add_text("title", "\n".join(title_lines))
    info.add_text("captions", json.dumps(captions))
    tmp = f"{path}.tmp"
    canvas.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return {"scale": scale, "cell": (cell_w, img_h), "size": canvas.size, "columns": ncol, "origins": origins, "row_offset": img_h + pad}
