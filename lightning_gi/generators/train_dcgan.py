"""Fit a small DCGAN generator to the bundled offline photographs (the GIAS demo's generator prior).

``python -m lightning_gi.generators.train_dcgan --out checkpoints/dcgan_photos32.pt`` (800 steps, about 30 s of
CPU time on one core). Adversarial training is slow and unstable at this budget, so the generator is fitted by latent
optimisation (GLO, Bojanowski et al. 2018): every training image gets a latent code on the sphere of radius
sqrt(z_dim) (where N(0, I) samples concentrate), and codes and generator weights are trained jointly to
reconstruct the images (MSE + L1). The result is a DCGAN whose range covers the photographs' crops, a
generator "trained on the approximate distribution of the user data" as GIAS assumes.

Data: :class:`~lightning_gi.victim.data.BundledPhotographs` random crops drawn with ``crop_seed`` (default 1),
plus their mirror images, WITHOUT crop 0 of each photograph (its central square, which every crop seed
contains and which the demo victims' batches can hold): the victim's exact images are not training images.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dcgan import DCGANGenerator

__all__ = ["photographs_training_set", "fit_generator_glo", "train_photos_generator"]


def photographs_training_set(image_size: int = 32, crops_per_photo: int = 32, crop_seed: int = 1, flips: bool = True) -> Tensor:
    """Bundled photograph crops in [0, 1] (central crops excluded), optionally with horizontal flips."""
    from ..victim.data import BundledPhotographs

    ds = BundledPhotographs(image_size=image_size, channels=3, crops_per_photo=crops_per_photo, seed=crop_seed)
    keep = [i for i in range(len(ds)) if i % crops_per_photo != 0]
    x = ds.images[keep]
    if flips:
        x = torch.cat([x, x.flip(-1)])
    return x.contiguous()


def _project(codes: Tensor) -> Tensor:
    return codes * (math.sqrt(codes.shape[1]) / codes.norm(dim=1, keepdim=True).clamp_min(1e-8))


def fit_generator_glo(
    generator: DCGANGenerator,
    images: Tensor,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    code_lr: float = 5e-2,
    seed: int = 0,
    log_every: int = 0,
) -> dict[str, float]:
    """Jointly fit ``generator`` and one code per image to ``images`` ([0, 1]); returns final losses."""
    gen = torch.Generator().manual_seed(seed)
    target = images * 2 - 1
    m = target.shape[0]
    codes = torch.nn.Parameter(_project(torch.randn(m, generator.z_dim, generator=gen)))
    opt = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_codes = torch.optim.Adam([codes], lr=code_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    generator.train()
    last = math.nan
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, m, (min(batch_size, m),), generator=gen)
        out = generator(codes[idx])
        loss = F.mse_loss(out, target[idx]) + 0.5 * F.l1_loss(out, target[idx])
        opt.zero_grad()
        opt_codes.zero_grad()
        loss.backward()
        opt.step()
        opt_codes.step()
        sched.step()
        with torch.no_grad():
            codes.copy_(_project(codes))
        last = float(loss.detach())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {last:.4f} ({time.time() - t0:.0f}s)", flush=True)
    # BatchNorm running statistics recomputed over all codes so that eval mode reproduces train mode
    with torch.no_grad():
        bns = [mod for mod in generator.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        for chunk in codes.detach().split(256):
            generator(chunk)
        for bn in bns:
            bn.momentum = 0.1
        generator.eval()
        rec = torch.cat([generator(c) for c in codes.detach().split(256)])
        mse01 = float(F.mse_loss((rec + 1) / 2, images))
    return {"train_loss": last, "eval_mse": mse01, "psnr": -10 * math.log10(max(mse01, 1e-12)), "images": float(m)}


def train_photos_generator(
    out: Optional[str] = "checkpoints/dcgan_photos32.pt",
    image_size: int = 32,
    z_dim: int = 64,
    ngf: int = 32,
    crops_per_photo: int = 32,
    crop_seed: int = 1,
    steps: int = 800,
    batch_size: int = 64,
    seed: int = 0,
    log_every: int = 0,
    **_: object,
) -> DCGANGenerator:
    """Build, fit and (when ``out``) save the ``dcgan_photos32`` generator (registry name ``dcgan_photos32``)."""
    torch.manual_seed(seed)
    generator = DCGANGenerator(resolution=image_size, z_dim=z_dim, ngf=ngf)
    images = photographs_training_set(image_size, crops_per_photo, crop_seed)
    stats = fit_generator_glo(generator, images, steps=steps, batch_size=batch_size, seed=seed, log_every=log_every)
    generator.training_stats = stats
    if out:
        from .registry import save_generator

        save_generator(generator, out, name=f"dcgan_photos{image_size}")
    return generator.eval()


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="checkpoints/dcgan_photos32.pt")
    p.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    p.add_argument("--z-dim", type=int, default=64)
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--crops-per-photo", type=int, default=32)
    p.add_argument("--crop-seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    g = train_photos_generator(a.out, a.image_size, a.z_dim, a.ngf, a.crops_per_photo, a.crop_seed, a.steps, a.batch_size, a.seed, log_every=max(1, a.steps // 10))
    print(f"wrote {a.out} in {time.time() - t0:.0f}s; fit: {g.training_stats}")


if __name__ == "__main__":  # pragma: no cover
    main()
