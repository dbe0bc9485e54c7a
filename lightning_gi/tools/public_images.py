"""``lightning-gi public-images``: a file of labelled public images for label recovery.

``AutoLabels(public_path=...)`` (the label rule chosen by rehearsal) and ``CalibratedCounts(public_path=...)``
read labelled images of the victim's classes that are NOT the client's. This command writes them as a tensor
file (``{"images": float [M, C, H, W] in [0, 1], "labels": long [M]}``, read back with ``weights_only=True``)::

    lightning-gi public-images --dataset digits --image_size 32 --out public_digits.pt
    lightning-gi public-images --dataset cifar10 --root data/ --image_size 32 --per_class 50 --out public_cifar10.pt
    lightning-gi public-images --dataset imagefolder --root my_public_images/ --image_size 64 --out public.pt

Labels are the dataset's class indices (an image folder: its sub-folders in sorted order, as torchvision's
``ImageFolder`` and a victim trained on it number them). The images must be of the victim's classes but not the
client's: the bundled digits' public pool, a torchvision dataset's test split, or a folder of your own. The bundled
photographs are refused: their public pool holds other pictures, whose labels do not name the attacked classes.
"""
from __future__ import annotations

from typing import Any, Optional

from ..victim.data import Pool

PROG = "lightning-gi public-images"
DESCRIPTION = "Write labelled public images of the victim's classes for label recovery (AutoLabels, CalibratedCounts)."


def public_images(
    out: str,
    dataset: str = "digits",
    root: Optional[str] = None,
    train: bool = False,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
    per_class: Optional[int] = None,
) -> dict[str, Any]:
    """Labelled public images, written to ``out`` (a ``.pt`` tensor file).

    Args:
        out: output file (.pt).
        dataset: dataset name (digits: the bundled digits' public pool; imagefolder; cifar10, mnist, ...).
        root: directory of an on-disk dataset (imagefolder: one sub-folder per class).
        train: torchvision datasets: take the training split instead of the test split.
        image_size: side of the square images (the victim's input size).
        channels: 1 or 3.
        seed: seed of the per-class subsample.
        per_class: keep at most this many images of each class (None: all).
    """
    import torch

    from ..victim.data import build_dataset, dataset_key, is_bundled

    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    key = dataset_key(dataset)
    if key == "photographs":
        raise ValueError("the bundled photographs cannot serve as labelled public images: their public pool holds "
                         "other pictures, whose labels do not name the attacked classes (use digits, imagefolder or a "
                         "dataset's test split)")
    pool: Pool = "public" if is_bundled(key) else "private"
    data = build_dataset(dataset, root=root, image_size=image_size, channels=channels, train=train, pool=pool)
    items = [data[i] for i in range(len(data))]
    if not items:
        raise ValueError(f"dataset {dataset!r} has no images")
    images = torch.stack([torch.as_tensor(x).float() for x, _ in items])
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)
    if per_class is not None:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.cat([idx[torch.randperm(idx.numel(), generator=gen)[:per_class]]
                          for idx in (torch.nonzero(labels == c).flatten() for c in labels.unique())]).sort().values
        images, labels = images[keep], labels[keep]
    torch.save({"images": images, "labels": labels}, out)
    print(f"wrote {out}: {images.shape[0]} images of {labels.unique().numel()} classes, {tuple(images.shape[1:])}")
    return {"images": images, "labels": labels}


def main(argv: Optional[list[str]] = None, exit_on_error: bool = True) -> Any:
    """Parse ``argv`` (see :func:`public_images`) and run; returns the dict written."""
    from . import run_command

    return run_command(public_images, argv, PROG, DESCRIPTION, exit_on_error)


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main as cli_main

    cli_main(["public-images", *__import__("sys").argv[1:]])
