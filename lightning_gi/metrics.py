"""Reconstruction quality of a gradient inversion attack against the private ground truth.

An attack returns its images in no particular order, so every score is computed after a one-to-one
assignment of reconstructions to ground-truth images (Hungarian matching on per-pair MSE).

LPIPS is built from local files only: the small linear heads ship inside the ``lpips`` package, the
torchvision backbone (AlexNet / VGG16 / SqueezeNet ImageNet weights) must be on disk under the file
name torchvision uses (see ``checkpoints/README.md``); nothing is downloaded.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_gi.checkpoints import (
    CHECKPOINTS_README,
    CorruptCheckpointError,
    find_checkpoint,
    load_state_dict_file,
)

__all__ = [
    "LPIPS_BACKBONE_FILES",
    "match_reconstructions",
    "load_lpips",
    "lpips_unavailable_reason",
    "per_image_scores",
    "reconstruction_metrics",
    "ReconstructionQuality",
    "SATURATION_THRESHOLD",
    "saturated_fraction",
    "saturation_warning",
    "ssim_kernel_size",
    "ssim_sigma",
]

# torchvision's own file names for the ImageNet weights that lpips uses as its backbone.
LPIPS_BACKBONE_FILES: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_NET_ALIASES = {
    "alex": "alex",
    "alexnet": "alex",
    "vgg": "vgg",
    "vgg16": "vgg",
    "squeeze": "squeeze",
    "squeezenet": "squeeze",
    "squeezenet1_1": "squeeze",
}
_SLICE_KEY = re.compile(r"^slice(\d+)\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------------
def _check_images(reconstructions: Tensor, ground_truth: Tensor) -> None:
    if reconstructions.dim() != 4 or ground_truth.dim() != 4:
        raise ValueError(
            "expected image batches [N,C,H,W]; got reconstructions of shape "
            f"{tuple(reconstructions.shape)} and ground truth of shape {tuple(ground_truth.shape)}"
        )
    if reconstructions.shape[1:] != ground_truth.shape[1:]:
        raise ValueError(
            "reconstructions and ground truth differ in image shape: reconstructions "
            f"{tuple(reconstructions.shape)} vs ground truth {tuple(ground_truth.shape)}"
        )
    if reconstructions.shape[0] < ground_truth.shape[0]:
        raise ValueError(
            f"fewer reconstructions ({tuple(reconstructions.shape)}) than ground-truth images "
            f"({tuple(ground_truth.shape)}); every ground-truth image needs its own reconstruction"
        )


def _pairwise_mse(ground_truth: Tensor, reconstructions: Tensor) -> Tensor:
    """[N_gt, N_rec] mean squared error, via |a|^2 + |b|^2 - 2ab in float64 (no N_gt*N_rec*D tensor)."""
    g = ground_truth.detach().flatten(1).to(torch.float64)
    r = reconstructions.detach().flatten(1).to(g.device, torch.float64)
    sq = (g * g).sum(1, keepdim=True) + (r * r).sum(1).unsqueeze(0) - 2.0 * g @ r.T
    return sq.clamp_min(0.0) / g.shape[1]


def match_reconstructions(reconstructions: Tensor, ground_truth: Tensor) -> Tensor:
    """One-to-one assignment minimising total per-pair MSE (the attack's outputs are unordered).

    Returns a LongTensor ``perm`` of length N_gt (on CPU): ``reconstructions[perm[i]]`` is assigned to
    ``ground_truth[i]``. More reconstructions than ground-truth images is allowed (extras are unused).
    """
    from scipy.optimize import linear_sum_assignment  # imported where used (startup cost)

    _check_images(reconstructions, ground_truth)
    cost = _pairwise_mse(ground_truth, reconstructions).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = torch.empty(ground_truth.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


# --------------------------------------------------------------------------------------------------
# Per-image scores
# --------------------------------------------------------------------------------------------------
def ssim_kernel_size(height: int, width: int, default: int = 11) -> int:
    """Gaussian SSIM window: ``default`` (11) shrunk to the largest odd size <= min(H, W)."""
    k = min(default, height, width)
    if k % 2 == 0:
        k -= 1
    return max(k, 1)


def ssim_sigma(kernel_size: int) -> float:
    """Gaussian sigma for an SSIM window of ``kernel_size`` (1.5 for the standard 11, scaled down).

    torchmetrics sizes a Gaussian window from sigma alone (``int(3.5 * sigma + 0.5) * 2 + 1``), ignoring
    ``kernel_size``; shrinking the window therefore means shrinking sigma in proportion.
    """
    return 1.5 * kernel_size / 11.0


def per_image_scores(matched_reconstructions: Tensor, ground_truth: Tensor) -> dict[str, Tensor]:
    """Per-image ``mse``, ``psnr`` and ``ssim`` (each [N], float64) of already-paired batches in [0, 1]."""
    if matched_reconstructions.shape != ground_truth.shape:
        raise ValueError(
            f"paired batches must have equal shapes: {tuple(matched_reconstructions.shape)} vs "
            f"{tuple(ground_truth.shape)}"
        )
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    # float64: in float32 torchmetrics' SSIM of identical flat regions drifts from 1 (variance round-off)
    preds = matched_reconstructions.detach().to(torch.float64)
    target = ground_truth.detach().to(preds.device, torch.float64)
    mse = (preds - target).pow(2).flatten(1).mean(1)
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    k = ssim_kernel_size(preds.shape[-2], preds.shape[-1])
    ssim = structural_similarity_index_measure(
        preds, target, gaussian_kernel=True, sigma=ssim_sigma(k), kernel_size=k, data_range=1.0, reduction="none"
    )
    return {"mse": mse, "psnr": psnr.reshape(-1), "ssim": ssim.reshape(-1)}


# --------------------------------------------------------------------------------------------------
# LPIPS from local weights
# --------------------------------------------------------------------------------------------------
def _canonical_net(net: str) -> str:
    try:
        return _NET_ALIASES[net.lower()]
    except KeyError:
        raise ValueError(f"unknown LPIPS net '{net}'; choose one of {sorted(_NET_ALIASES)}") from None


def _backbone_file(net: str, backbone_path: Optional[Union[str, Path]]) -> str:
    return str(backbone_path) if backbone_path is not None else LPIPS_BACKBONE_FILES[_canonical_net(net)]


def lpips_unavailable_reason(net: str = "alex", backbone_path: Optional[Union[str, Path]] = None) -> str:
    """Why :func:`load_lpips` returns None for ``net``, in one short line naming the missing file and where
    torchvision's cache (``torch.hub.get_dir()/checkpoints``) expects it; "" if the file is there."""
    name = _backbone_file(net, backbone_path)
    if find_checkpoint(name) is not None:
        return ""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return f"LPIPS off: to enable it, put {Path(name).name} in {hub} or ./checkpoints (nothing is downloaded)."


def _backbone_state_for_lpips(source: dict[str, Tensor], target: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Map torchvision ``features.{i}.*`` keys onto lpips' ``slice{k}.{i}.*`` keys, strictly.

    lpips builds its slices from the very modules of ``tv.<net>().features`` and names each one by
    its index there, so ``slice{k}.{i}.weight`` is ``features.{i}.weight``. A file already in the
    lpips layout (``slice*`` keys) is accepted as is. ``classifier.*`` keys are ignored.
    """
    source = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}
    if target.keys() <= source.keys():
        mapped = {k: source[k] for k in target}
    else:
        mapped, missing = {}, []
        for key in target:
            m = _SLICE_KEY.match(key)
            src = f"features.{m.group(2)}.{m.group(3)}" if m else key
            if src in source:
                mapped[key] = source[src]
            else:
                missing.append(src)
        used = {f"features.{m.group(2)}.{m.group(3)}" for m in map(_SLICE_KEY.match, target) if m}
        unexpected = sorted(k for k in source if k.startswith("features.") and k not in used)
        if missing or unexpected:
            raise CorruptCheckpointError(
                f"LPIPS backbone: '{path}' does not fit the lpips network (missing keys: {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}; unexpected keys: {unexpected[:8]}"
                f"{'...' if len(unexpected) > 8 else ''}). Is it the right torchvision file? "
                f"See {CHECKPOINTS_README}."
            )
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    if bad:
        raise CorruptCheckpointError(
            f"LPIPS backbone: '{path}' has tensors of the wrong shape ({'; '.join(bad[:4])}). "
            f"See {CHECKPOINTS_README}."
        )
    return mapped


def load_lpips(
    net: str = "alex",
    backbone_path: Optional[Union[str, Path]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Optional[nn.Module]:
    """An ``lpips.LPIPS`` model built offline, or None when the backbone file is not on disk.

    The backbone weights come from ``backbone_path`` or torchvision's default file name, found with
    :func:`find_checkpoint` (which also searches torch hub's cache); when absent, see
    :func:`lpips_unavailable_reason`. A corrupt or ill-fitting file raises ``CorruptCheckpointError``.
    The model is in eval mode without gradients and expects inputs in [-1, 1].
    """
    canonical = _canonical_net(net)
    path = find_checkpoint(_backbone_file(canonical, backbone_path))
    if path is None:
        return None
    source = load_state_dict_file(path, what=f"LPIPS {canonical} backbone")

    import lpips  # deferred: importing lpips pulls in torchvision models

    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=False`
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models")
        model = lpips.LPIPS(net=canonical, pretrained=True, pnet_rand=True, verbose=False)
    mapped = _backbone_state_for_lpips(source, model.net.state_dict(), path)
    try:
        model.net.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise CorruptCheckpointError(f"LPIPS backbone: '{path}' does not fit ({err}). See {CHECKPOINTS_README}.") from None
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def _lpips_scores(model: nn.Module, matched_reconstructions: Tensor, ground_truth: Tensor) -> Tensor:
    """Per-image LPIPS of paired [0,1] batches (scaled to [-1,1]; grey images repeated to RGB)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else ground_truth.device
    a = matched_reconstructions.detach().float().to(device) * 2.0 - 1.0
    b = ground_truth.detach().float().to(device) * 2.0 - 1.0
    if a.shape[1] == 1:
        a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return model(a, b).reshape(a.shape[0], -1).mean(1).cpu()


# --------------------------------------------------------------------------------------------------
# Saturation (a symptom of a wrong normalisation)
# --------------------------------------------------------------------------------------------------
SATURATION_THRESHOLD = 0.2
_CLIP_TOL = 1.0 / 510.0  # half an 8-bit level: a pixel this close to 0 or 1 counts as clipped


def saturated_fraction(images: Tensor) -> float:
    """Share of the values of an image batch in [0, 1] that sit at 0 or 1 (clipped), in [0, 1]."""
    x = images.detach().float()
    if x.numel() == 0:
        return 0.0
    x = torch.nan_to_num(x, nan=0.5).clamp(0.0, 1.0)
    return float(((x <= _CLIP_TOL) | (x >= 1.0 - _CLIP_TOL)).float().mean())


def saturation_warning(
    reconstructions: Tensor,
    ground_truth: Optional[Tensor] = None,
    threshold: float = SATURATION_THRESHOLD,
    distance_ratio: Optional[float] = None,
) -> Optional[str]:
    """A one-line warning when more than ``threshold`` of the reconstruction's pixels are clipped at 0 or 1
    (and, with a ground truth, clearly more than in it), else None.

    A reconstruction optimised in the victim's input space is mapped to [0, 1] with the client's mean/std;
    with a missing or wrong normalisation most pixels land outside [0, 1] and are clipped, so the image
    looks saturated and its PSNR/SSIM under-report the leakage (issue 14: 11.9 dB instead of 70 dB).
    A random start (standard normal in input space) is saturated too: ``distance_ratio`` (best matching
    distance / distance at the first step) tells the two apart; above 0.01 the attack has not converged.
    """
    frac = saturated_fraction(reconstructions)
    reference = 0.0 if ground_truth is None else saturated_fraction(ground_truth)
    if frac <= threshold or frac <= reference + 0.1:
        return None
    ref = "" if ground_truth is None else f" (ground truth: {reference:.0%})"
    head = f"reconstruction saturated: {frac:.0%} of pixels clipped at 0 or 1{ref}; "
    if distance_ratio is not None and distance_ratio > 0.01:
        return head + (
            f"the attack has probably not converged (matching distance still {distance_ratio:.0%} of its first "
            "value); if it has, check the normalisation (mean/std of the victim's input)"
        )
    cause = "the gradients match, so " if distance_ratio is not None else "if the attack converged, "
    return head + (
        f"{cause}the likely cause is a missing or wrong normalisation (mean/std of the victim's input), which "
        "makes the scores under-report the leakage"
    )


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def _labels_list(labels: Optional[Tensor], n: int, what: str) -> Optional[list[int]]:
    if labels is None:
        return None
    t = torch.as_tensor(labels).detach().reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{what}: expected {n} labels, got shape {tuple(torch.as_tensor(labels).shape)}")
    return [int(v) for v in t.cpu().tolist()]


def reconstruction_metrics(
    reconstructions: Tensor,
    ground_truth: Tensor,
    reconstructed_labels: Optional[Tensor] = None,
    true_labels: Optional[Tensor] = None,
    lpips_model: Optional[nn.Module] = None,
    lpips_note: Optional[str] = None,
    distance_ratio: Optional[float] = None,
) -> dict[str, Any]:
    """JSON-serialisable quality report after one-to-one assignment (means over ground-truth images).

    Keys: mse, psnr, ssim, lpips (None without a model or when it cannot run), lpips_note,
    label_accuracy (the headline label figure: order-free multiset accuracy, i.e. the share of true labels
    found among the recovered ones, so a permutation scores 1.0), labels_off (true labels missed),
    label_accuracy_paired (per-image: the label of the reconstruction paired with each ground-truth image by
    the image assignment, which depends on how well noisy images pair up), label_multiset_accuracy (same
    as label_accuracy), saturation (share of reconstruction pixels clipped at 0 or 1), saturation_warning
    (see :func:`saturation_warning`, which ``distance_ratio`` refines), assignment, num_images,
    per_image. PSNR of a perfect reconstruction is ``inf`` (``json.dumps`` writes Infinity).
    """
    _check_images(reconstructions, ground_truth)
    rec = reconstructions.detach().float().clamp(0.0, 1.0)
    gt = ground_truth.detach().float().clamp(0.0, 1.0).to(rec.device)
    n = gt.shape[0]
    perm = match_reconstructions(rec, gt)
    matched = rec[perm.to(rec.device)]
    scores = per_image_scores(matched, gt)

    lpips_values: Optional[list[float]] = None
    note: Optional[str] = None
    if lpips_model is None:
        note = lpips_note or "no LPIPS model given"
    else:
        try:
            lpips_values = [float(v) for v in _lpips_scores(lpips_model, matched, gt)]
        except RuntimeError as err:  # e.g. images too small for the backbone's pooling
            note = f"LPIPS could not be computed for images of shape {tuple(gt.shape[1:])}: {err}"

    rec_labels = _labels_list(reconstructed_labels, rec.shape[0], "reconstructed_labels")
    gt_labels = _labels_list(true_labels, n, "true_labels")
    paired_accuracy = multiset_accuracy = labels_off = None
    assigned_labels: Optional[list[int]] = None
    if rec_labels is not None and gt_labels is not None:
        assigned_labels = [rec_labels[j] for j in perm.tolist()]
        paired_accuracy = sum(a == t for a, t in zip(assigned_labels, gt_labels)) / n
        hits = sum((Counter(rec_labels) & Counter(gt_labels)).values())
        multiset_accuracy, labels_off = hits / n, n - hits

    mse, psnr, ssim = (scores[k].cpu().tolist() for k in ("mse", "psnr", "ssim"))
    per_image = [
        {
            "index": i,
            "assigned_reconstruction": int(perm[i]),
            "mse": float(mse[i]),
            "psnr": float(psnr[i]),
            "ssim": float(ssim[i]),
            "lpips": None if lpips_values is None else lpips_values[i],
            "label_true": None if gt_labels is None else gt_labels[i],
            "label_reconstructed": None if assigned_labels is None else assigned_labels[i],
        }
        for i in range(n)
    ]
    return {
        "mse": float(scores["mse"].mean()),
        "psnr": float(scores["psnr"].mean()),
        "ssim": float(scores["ssim"].mean()),
        "lpips": None if lpips_values is None else sum(lpips_values) / n,
        "lpips_note": note,
        "label_accuracy": multiset_accuracy,
        "labels_off": labels_off,
        "label_accuracy_paired": paired_accuracy,
        "label_multiset_accuracy": multiset_accuracy,
        "saturation": saturated_fraction(rec),
        "saturation_warning": saturation_warning(rec, gt, distance_ratio=distance_ratio),
        "assignment": [int(j) for j in perm.tolist()],
        "num_images": n,
        "per_image": per_image,
    }


class ReconstructionQuality(Metric):
    """Running means of per-image MSE / PSNR / SSIM, each ``update`` matched on its own (for logging)."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    mse_sum: Tensor
    psnr_sum: Tensor
    ssim_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("mse_sum", "psnr_sum", "ssim_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, reconstructions: Tensor, ground_truth: Tensor) -> None:
        rec = reconstructions.detach().float().clamp(0.0, 1.0)
        gt = ground_truth.detach().float().clamp(0.0, 1.0).to(rec.device)
        perm = match_reconstructions(rec, gt).to(rec.device)
        scores = per_image_scores(rec[perm], gt)
        self.mse_sum += scores["mse"].double().sum().to(self.mse_sum.device)
        self.psnr_sum += scores["psnr"].double().sum().to(self.psnr_sum.device)
        self.ssim_sum += scores["ssim"].double().sum().to(self.ssim_sum.device)
        self.count += gt.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1).double()
        return {
            "mse": (self.mse_sum / n).float(),
            "psnr": (self.psnr_sum / n).float(),
            "ssim": (self.ssim_sum / n).float(),
        }
