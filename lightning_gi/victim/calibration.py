"""An offline stand-in for a pretrained victim: BatchNorm running statistics from real public images.

Without pretrained weights (no downloads here) an untrained torchvision ResNet has BN running statistics
of 0 / 1, which makes the BN-statistics prior (GradInversion, Ye et al. 2024) meaningless. This factory
keeps the random weights but re-estimates every BN layer's running mean/variance on the bundled PUBLIC
images (:func:`lightning_gi.victim.data.public_images`, disjoint from the private photographs a victim's
batch is cut from; the cumulative average over a few forward passes in train mode), so the prior has real
image statistics to pull towards, but not the private images' own. With ``weights_path`` the pretrained
file is loaded instead and nothing is re-estimated (a pretrained model already carries its training
set's statistics).

Config use (``data.init_args.model``)::

    model:
      class_path: lightning_gi.victim.calibration.bn_calibrated_classifier
      init_args: {name: resnet18, num_classes: 14, image_size: 64, seed: 0}
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .models import reinitialise, remember_builder, torchvision_classifier

__all__ = ["bn_calibrated_classifier", "calibrate_batchnorm", "calibration_images"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> nn.Module:
    """Replace every BN layer's running statistics by their cumulative average over ``images`` (input space)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    try:
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size]
            if chunk.shape[0] > 1:
                model(chunk)
    finally:
        for m, (momentum, _) in zip(bns, saved):
            m.momentum = momentum
        model.train(was_training)
    return model


def bn_calibrated_classifier(
    name: str = "resnet18",
    num_classes: int = 14,
    image_size: int = 64,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    seed: int = 0,
    weights_path: Optional[str] = None,
    crops_per_photo: int = 6,
    calibration_seed: int = 7,
) -> nn.Module:
    """A torchvision classifier (or ``name="convnet"``: :class:`~lightning_gi.victim.models.ConvNet` with
    BatchNorm), random init drawn from ``seed``, whose BN statistics come from public images.

    The calibration images are ``crops_per_photo`` random crops of each bundled PUBLIC photograph
    (``calibration_seed``), normalised with ``mean``/``std`` (default ImageNet's; use the victim
    DataModule's values). With ``weights_path`` the file is loaded and no calibration happens.
    Returned in eval mode.
    """
    if name == "convnet":  # the offline demos' small victim, with BatchNorm
        from .models import ConvNet, load_weights

        model = ConvNet(num_classes=num_classes, image_size=image_size, norm="batch")
        if weights_path is not None:
            load_weights(model, weights_path)
    else:
        model = torchvision_classifier(name, num_classes=num_classes, weights_path=weights_path)
    if weights_path is None:
        reinitialise(model, seed)
        images = calibration_images(image_size, crops_per_photo, calibration_seed)
        m = torch.tensor(list(mean if mean is not None else _IMAGENET_MEAN), dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(list(std if std is not None else _IMAGENET_STD), dtype=torch.float32).view(-1, 1, 1)
        calibrate_batchnorm(model, (images.float() - m) / s)
    # a data.model_seed re-draw rebuilds the calibrated model with that seed (not a bare torchvision one)
    remember_builder(
        model, bn_calibrated_classifier, name=name, num_classes=num_classes, image_size=image_size,
        mean=None if mean is None else list(mean), std=None if std is None else list(std), seed=seed,
        weights_path=weights_path, crops_per_photo=crops_per_photo, calibration_seed=calibration_seed,
    )
    return model.eval()


bn_calibrated_classifier.seed_argument = "seed"  # type: ignore[attr-defined]  # see models.reinitialise


def calibration_images(image_size: int, crops_per_photo: int = 6, calibration_seed: int = 7) -> torch.Tensor:
    """The images :func:`bn_calibrated_classifier` calibrates on, in [0,1]: public-pool crops only."""
    from .data import public_images, public_photograph_count

    return public_images(image_size, crops_per_photo * public_photograph_count(), seed=calibration_seed, channels=3)
