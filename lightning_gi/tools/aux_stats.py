"""``lightning-gi aux-stats``: auxiliary feature statistics of public images on a victim model.

The statistics (Ye et al. 2024, Stage I) are computed by :mod:`lightning_gi.labels.auxiliary_stats`;
this module is the command line only::

    lightning-gi aux-stats --model resnet34 --weights_path resnet34-b627a593.pth \\
        --num_classes 1000 --image_size 224 --out checkpoints/resnet34_aux_stats.pt
"""
from __future__ import annotations

from typing import Any, Optional

from ..labels.auxiliary_stats import IMAGENET_MEAN, IMAGENET_STD, AuxiliaryStats, AuxSource

PROG = "lightning-gi aux-stats"
DESCRIPTION = "Sorted-feature statistics of public images on a victim model (Ye et al. 2024, Stage I)."


def aux_stats(
    out: str,
    model: str = "resnet34",
    num_classes: int = 1000,
    weights_path: Optional[str] = None,
    model_seed: Optional[int] = None,
    calibrate_bn: bool = False,
    image_size: int = 224,
    source: AuxSource = "public",
    image_folder: Optional[str] = None,
    count: int = 40,
    seed: int = 1,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    positions: int = 20,
) -> AuxiliaryStats:
    """Sorted-feature statistics of public images on a victim model, written to a file.

    Args:
        out: output file (.pt or .safetensors).
        model: torchvision model name (resnet18, resnet34, ...).
        num_classes: classes of the victim's last layer.
        weights_path: local state dict of the victim (bare names are searched in checkpoints/).
        model_seed: untrained victim: seed of its initialisation.
        calibrate_bn: untrained victim: BN running statistics from the bundled public images (as the demo victim).
        image_size: side of the square images fed to the victim.
        source: bundled public images (every name is the public pool).
        image_folder: use every image under this folder instead of --source.
        count: number of public images.
        seed: seed of the public image crops.
        mean: victim normalisation mean (three values).
        std: victim normalisation std (three values).
        positions: M, the number of lowest-CV sorted positions kept.
    """
    import torch

    from ..labels.auxiliary_stats import auxiliary_stats_for_model, save_auxiliary_stats
    from ..victim.calibration import bn_calibrated_classifier
    from ..victim.models import reinitialise, torchvision_classifier

    if calibrate_bn:
        victim = bn_calibrated_classifier(model, num_classes, image_size=image_size, mean=mean, std=std,
                                          seed=model_seed or 0, weights_path=weights_path)
    else:
        victim = torchvision_classifier(model, num_classes=num_classes, weights_path=weights_path)
        if model_seed is not None:
            reinitialise(victim, model_seed)
    images = None
    if image_folder:
        from ..victim.data import image_folder as folder_dataset

        ds = folder_dataset(image_folder, image_size, 3)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
    stats = auxiliary_stats_for_model(victim.eval(), source, image_size, count, seed, mean, std, positions, images=images)
    stats.metadata.update({"model": model, "weights_path": str(weights_path), "model_seed": str(model_seed)})
    save_auxiliary_stats(stats, out)
    print(f"wrote {out}: {stats.num_images} images, feature_dim {stats.feature_dim}, positions {stats.positions.tolist()}")
    return stats


def main(argv: Optional[list[str]] = None, exit_on_error: bool = True) -> Any:
    """Parse ``argv`` (see :func:`aux_stats`) and run; returns the :class:`AuxiliaryStats` written."""
    from . import run_command

    return run_command(aux_stats, argv, PROG, DESCRIPTION, exit_on_error)


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main as cli_main

    cli_main(["aux-stats", *__import__("sys").argv[1:]])
