"""``lightning-gi train-dcgan``: fit a DCGAN prior to the bundled PUBLIC images (GIAS's demo generators).

The fit is :func:`lightning_gi.generators.train_dcgan.train_prior_generator`; this module is the command
line only. Unset options take the registry recipe of the prior (``dcgan_digits32`` for ``--dataset digits``,
``dcgan_photos32`` for ``--dataset photographs``)::

    lightning-gi train-dcgan --dataset digits          # -> checkpoints/dcgan_digits32.pt
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from ..generators.train_dcgan import PriorDataset

PROG = "lightning-gi train-dcgan"
DESCRIPTION = "Fit a small DCGAN generator prior to the PUBLIC bundled images (the GIAS demo's generator)."

PRIORS: dict[str, str] = {"digits": "dcgan_digits32", "photographs": "dcgan_photos32"}


def train_dcgan(
    dataset: PriorDataset = "digits",
    out: Optional[str] = None,
    image_size: Optional[Literal[32, 64]] = None,
    z_dim: Optional[int] = None,
    ngf: Optional[int] = None,
    crops_per_photo: Optional[int] = None,
    crop_seed: Optional[int] = None,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
    threads: int = 1,
) -> Any:
    """Fit a DCGAN prior to the public pool of the bundled images and write it.

    Args:
        dataset: public pool to fit.
        out: output file (default: the registry's file name in $LIGHTNING_GI_CHECKPOINTS when set, else in ./checkpoints/).
        image_size: generator resolution (default: the recipe's, 32).
        z_dim: latent size (default: the recipe's).
        ngf: generator width (default: the recipe's).
        crops_per_photo: photographs only: crops per public photograph.
        crop_seed: photographs only: seed of the crops.
        steps: optimisation steps (default: the recipe's).
        batch_size: images per step (default: the recipe's).
        seed: seed of the weights and latent codes.
        threads: torch CPU threads.
    """
    import time

    import torch

    from ..checkpoints import resolve_checkpoint
    from ..generators.registry import generator_file
    from ..generators.train_dcgan import prior_recipe, train_prior_generator

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    name = PRIORS[dataset]
    recipe = prior_recipe(name)
    given = dict(image_size=image_size, z_dim=z_dim, ngf=ngf, crops_per_photo=crops_per_photo, crop_seed=crop_seed, steps=steps, batch_size=batch_size)
    recipe.update({k: v for k, v in given.items() if v is not None})
    # an explicit --out is written as given; the default goes where the checkpoint search finds it first
    target = out if out else resolve_checkpoint(generator_file(name), if_missing="destination")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    g = train_prior_generator(str(target), seed=seed, name=name if recipe["image_size"] == 32 else None, **recipe)
    print(f"wrote {target} in {time.perf_counter() - t0:.0f}s; fit: {g.training_stats}")
    return g


def main(argv: Optional[list[str]] = None, exit_on_error: bool = True) -> Any:
    """Parse ``argv`` (see :func:`train_dcgan`) and run; returns the fitted generator."""
    from . import run_command

    return run_command(train_dcgan, argv, PROG, DESCRIPTION, exit_on_error)


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main as cli_main

    cli_main(["train-dcgan", *__import__("sys").argv[1:]])
