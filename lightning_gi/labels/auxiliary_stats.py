"""Auxiliary feature statistics for the evolutionary label-count search (Ye et al., AAAI 2024, Stage I).

From a few public images (the authors use ~40 web images) the attacker computes, on the victim model:

1. the penultimate features ``h_i`` (the input of the last ``nn.Linear``, read by a forward pre-hook);
2. each image's feature vector sorted ascending, ``h^S_i = sort(h_i)``;
3. per sorted position ``j``: ``mean_j = E_i[h^S_ij]``, ``std_j = Std_i[h^S_ij]`` (population std, ddof 0;
   the ranking below does not depend on the ddof), ``cv_j = std_j / mean_j`` (``inf`` where ``mean_j <= 0``,
   e.g. the all-zero head of sorted ReLU features);
4. ``positions`` = the ``M`` (paper: 20) positions with the smallest CV, in increasing CV order.

The result is small (a few ``[feature_dim]`` vectors) and is written once per victim model to a file that
any attack's :class:`~lightning_gi.labels.EvolutionaryLabelCounts` can reuse::

    lightning-gi aux-stats --model resnet34 --weights_path resnet34-b627a593.pth \\
        --num_classes 1000 --image_size 224 --out checkpoints/resnet34_aux_stats.pt

(the command is :mod:`lightning_gi.tools.aux_stats`; this module only computes, saves and loads).

The file is a ``torch.save``d dict of tensors plus a ``metadata`` dict of strings/ints (loads with
``weights_only=True``), or a ``.safetensors`` file (tensors; metadata as strings).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, get_args

import torch
from torch import Tensor, nn

__all__ = [
    "AuxiliaryStats",
    "penultimate_features",
    "compute_auxiliary_stats",
    "auxiliary_images",
    "auxiliary_stats_for_model",
    "save_auxiliary_stats",
    "load_auxiliary_stats",
    "AUX_SOURCES",
    "AuxSource",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Every source is the PUBLIC pool of bundled images (lightning_gi.victim.data: disjoint from the private
# photographs a victim's batch is cut from, checked by source identity); random crops drawn with their own
# seed. "public" is the name; "photographs" and "textures" are kept as aliases of it for older configs.
AuxSource = Literal["public", "photographs", "textures"]
AUX_SOURCES: tuple[str, ...] = get_args(AuxSource)


@dataclass
class AuxiliaryStats:
    """Statistics of the sorted penultimate features of public images (see module docs)."""

    mean_sorted: Tensor  # [m] mean over images of the ascending-sorted feature vectors
    std_sorted: Tensor  # [m]
    cv: Tensor  # [m] std / mean (inf where mean <= 0)
    positions: Tensor  # [M] long: positions with the smallest CV
    num_images: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.mean_sorted.numel())

    def with_positions(self, num_positions: int) -> "AuxiliaryStats":
        """The same statistics with the ``num_positions`` lowest-CV positions."""
        return AuxiliaryStats(
            self.mean_sorted, self.std_sorted, self.cv, lowest_cv_positions(self.cv, num_positions), self.num_images, dict(self.metadata)
        )


def _last_linear(model: nn.Module) -> nn.Linear:
    from ..victim.models import classifier_head

    head = classifier_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: no penultimate features to read")
    return head[1]


@torch.no_grad()
def penultimate_features(model: nn.Module, images: Tensor, batch_size: int = 16) -> Tensor:
    """``[n, m]``: the input of the model's last ``nn.Linear`` for ``images`` (victim input space), eval mode."""
    layer = _last_linear(model)
    captured: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, inp: captured.append(inp[0].detach().flatten(1)))
    was_training = model.training
    model.eval()
    try:
        device = layer.weight.device
        for start in range(0, images.shape[0], batch_size):
            model(images[start : start + batch_size].to(device=device, dtype=layer.weight.dtype))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured).float().cpu()


def lowest_cv_positions(cv: Tensor, num_positions: int) -> Tensor:
    if num_positions < 1:
        raise ValueError(f"num_positions must be >= 1, got {num_positions}")
    finite = int(torch.isfinite(cv).sum())
    if finite == 0:
        raise ValueError("no sorted feature position has a positive mean: the features are all zero")
    k = min(num_positions, finite)
    return torch.argsort(cv, stable=True)[:k].long()


def compute_auxiliary_stats(features: Tensor, num_positions: int = 20, metadata: Optional[dict] = None) -> AuxiliaryStats:
    """Statistics of the sorted features ``[n, m]`` of ``n >= 2`` public images (module docs, steps 2-4)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape [n >= 2, m], got {tuple(features.shape)}")
    sorted_feats = torch.sort(features.double(), dim=1).values
    mean = sorted_feats.mean(dim=0)
    std = sorted_feats.std(dim=0, unbiased=False)
    cv = torch.where(mean > 1e-12, std / mean.clamp_min(1e-12), torch.full_like(mean, float("inf")))
    positions = lowest_cv_positions(cv, num_positions)
    return AuxiliaryStats(mean.float(), std.float(), cv.float(), positions, int(features.shape[0]), dict(metadata or {}))


def auxiliary_images(source: str = "public", image_size: int = 224, count: int = 40, seed: int = 1) -> Tensor:
    """``[count, 3, s, s]`` public RGB images in [0, 1] (offline): crops of the bundled PUBLIC pool only
    (:func:`lightning_gi.victim.data.public_images`), never of the photographs private batches come from."""
    if source not in AUX_SOURCES:
        raise ValueError(f"aux source must be one of {AUX_SOURCES}, got {source!r}")
    if count < 2:
        raise ValueError(f"need at least 2 auxiliary images, got {count}")
    from ..victim.data import public_images

    return public_images(image_size, count, seed=seed, channels=3)


def auxiliary_stats_for_model(
    model: nn.Module,
    source: str = "public",
    image_size: int = 224,
    count: int = 40,
    seed: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_positions: int = 20,
    images: Optional[Tensor] = None,
) -> AuxiliaryStats:
    """Public images (``images`` in [0,1], or ``count`` from ``source``) -> normalised -> features -> stats."""
    given = images is not None
    if images is None:
        images = auxiliary_images(source, image_size, count, seed)
    m = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    feats = penultimate_features(model, (images.float() - m) / s)
    meta = {"source": "given" if given else source, "image_size": int(images.shape[-1]), "count": int(images.shape[0])}
    return compute_auxiliary_stats(feats, num_positions, meta)


def save_auxiliary_stats(stats: AuxiliaryStats, path: str | os.PathLike) -> None:
    """Write ``stats`` (``.safetensors`` by extension, else ``torch.save`` of plain tensors/strings)."""
    path = os.fspath(path)
    tensors = {"mean_sorted": stats.mean_sorted.contiguous(), "std_sorted": stats.std_sorted.contiguous(),
               "cv": stats.cv.contiguous(), "positions": stats.positions.contiguous()}
    meta = {k: str(v) for k, v in stats.metadata.items()}
    meta["num_images"] = str(stats.num_images)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, path, metadata=meta)
    else:
        torch.save({"format": "lightning_gi.auxiliary_stats/1", **tensors, "metadata": meta}, path)


def load_auxiliary_stats(path: str | os.PathLike) -> AuxiliaryStats:
    """Read a file written by :func:`save_auxiliary_stats` (never executes code from the file)."""
    from ..checkpoints import resolve_checkpoint

    path = os.fspath(resolve_checkpoint(path, f"auxiliary statistics (create them with `lightning-gi aux-stats --model ... --out {os.fspath(path)}`)"))
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not an auxiliary statistics file")
        meta = dict(raw.get("metadata", {}))
    missing = [k for k in ("mean_sorted", "std_sorted", "cv", "positions") if k not in raw]
    if missing:
        raise ValueError(f"{path}: not an auxiliary statistics file (missing {missing})")
    num_images = int(meta.pop("num_images", 0))
    return AuxiliaryStats(raw["mean_sorted"].float(), raw["std_sorted"].float(), raw["cv"].float(),
                          raw["positions"].long(), num_images, meta)


def main(argv: Optional[list[str]] = None) -> AuxiliaryStats:
    """``lightning-gi aux-stats`` (kept here for ``python -m lightning_gi.labels.auxiliary_stats``): see
    :mod:`lightning_gi.tools.aux_stats`, which parses the command line."""
    from ..tools.aux_stats import main as command

    return command(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
