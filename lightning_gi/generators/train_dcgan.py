"""Fit a small DCGAN generator prior to PUBLIC bundled images (the GIAS demo's generator).

GIAS (Jeon et al. 2021) assumes a generator trained on public data from the clients' distribution, disjoint
from the clients' own images. The bundled data are split into a PRIVATE pool (what victims' batches are cut
from) and a PUBLIC pool (:mod:`lightning_gi.victim.data`); :func:`public_training_set` reads the PUBLIC pool
only (there is no argument that selects the private one), so no attacked image can be a training image.

Two priors (registry names in :mod:`lightning_gi.generators.registry`):

* ``dcgan_digits32`` (``--dataset digits``, the demo's): the PUBLIC scikit-learn digits (index 4 mod 5, those
  pixel-identical to a private digit removed), 32x32 grey. Same distribution as the attacked (private) digits,
  disjoint samples: GIAS's threat model.
* ``dcgan_photos32`` (``--dataset photographs``): random crops (and mirror images) of the PUBLIC photographs
  (textures, microscopy, astronomy). A DIFFERENT distribution from the private photographs (people, animals,
  objects): a mismatched prior, useful to study that case, not the paper's.

``lightning-gi train-dcgan --dataset digits`` (the command: :mod:`lightning_gi.tools.train_dcgan`) writes
``checkpoints/dcgan_digits32.pt``.

Adversarial training is slow and unstable at a CPU budget, so the generator is fitted by latent optimisation
(GLO, Bojanowski et al. 2018): every training image gets a latent code on the sphere of radius sqrt(z_dim)
(where N(0, I) samples concentrate) and codes and weights are trained jointly to reconstruct the images
(MSE + 0.5 L1). Progress (step, loss, elapsed, ETA) is written to stderr every few seconds.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Literal, Optional, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

from .dcgan import DCGANGenerator

__all__ = [
    "PriorDataset",
    "prior_recipe",
    "public_training_set",
    "photographs_training_set",
    "fit_generator_glo",
    "train_prior_generator",
    "train_photos_generator",
    "train_digits_generator",
]

PriorDataset = Literal["digits", "photographs"]

def prior_recipe(name: str) -> dict[str, Any]:
    """How registry variant ``name``'s file is made (its ``extra["recipe"]``): train_prior_generator(**recipe)."""
    from .registry import get_generator_config

    recipe = get_generator_config(name).extra.get("recipe")
    if recipe is None:
        raise ValueError(f"generator {name!r} is not trained by train_dcgan (it has no recipe)")
    return dict(recipe)


def public_training_set(
    dataset: PriorDataset = "digits",
    image_size: int = 32,
    channels: Optional[int] = None,
    crops_per_photo: int = 32,
    crop_seed: int = 1,
    flips: bool = True,
) -> Tensor:
    """Training images in [0, 1] ``[M, C, s, s]`` from the PUBLIC pool of ``dataset`` only.

    ``digits``: every public digit (no flips: a mirrored digit is not a digit). ``photographs``:
    ``crops_per_photo`` crops (seed ``crop_seed``) of each public photograph, plus mirror images when ``flips``.
    """
    from ..victim.data import BundledDigits, BundledPhotographs

    if dataset == "digits":
        x = BundledDigits(image_size=image_size, channels=channels or 1, pool="public").images
    elif dataset == "photographs":
        x = BundledPhotographs(image_size=image_size, channels=channels or 3, crops_per_photo=crops_per_photo, seed=crop_seed, pool="public").images
        if flips:
            x = torch.cat([x, x.flip(-1)])
    else:
        raise ValueError(f"dataset must be 'digits' or 'photographs', got {dataset!r}")
    return x.contiguous()


def photographs_training_set(image_size: int = 32, crops_per_photo: int = 32, crop_seed: int = 1, flips: bool = True) -> Tensor:
    """Crops of the PUBLIC photographs (``public_training_set("photographs", ...)``)."""
    return public_training_set("photographs", image_size, 3, crops_per_photo, crop_seed, flips)


class _Progress:
    """One line on ``stream`` at most every ``every_s`` seconds: step/total, loss, elapsed, ETA."""

    def __init__(self, total: int, what: str, every_s: float = 3.0, stream: Optional[TextIO] = None, enabled: bool = True) -> None:
        self.total, self.what, self.every_s = total, what, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.t0 = self.last = time.perf_counter()

    def write(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.what}] {text}", file=self.stream, flush=True)

    def update(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every_s and step != self.total):
            return
        self.last = now
        elapsed = now - self.t0
        eta = elapsed / max(step, 1) * (self.total - step)
        pct = 100.0 * step / max(self.total, 1)
        self.write(f"step {step}/{self.total} ({pct:3.0f}%) loss {loss:.4f}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s")


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
    progress: bool = True,
    progress_every_s: float = 3.0,
    stream: Optional[TextIO] = None,
) -> dict[str, float]:
    """Jointly fit ``generator`` and one code per image to ``images`` ([0, 1]); returns final losses.

    ``progress``: a line on ``stream`` (default stderr) every ``progress_every_s`` seconds and at the end;
    ``log_every``: additionally one line every ``log_every`` steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if images.ndim != 4 or images.shape[1] != generator.img_channels:
        raise ValueError(f"images must be [M, {generator.img_channels}, H, W] for this generator, got {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(seed)
    target = images * 2 - 1
    m = target.shape[0]
    codes = torch.nn.Parameter(_project(torch.randn(m, generator.z_dim, generator=gen)))
    opt = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_codes = torch.optim.Adam([codes], lr=code_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    generator.train()
    bar = _Progress(steps, "train_dcgan", progress_every_s, stream, enabled=progress or bool(log_every))
    bar.write(f"fitting a DCGAN ({sum(p.numel() for p in generator.parameters()):,} weights) to {m} public images, {steps} steps")
    last = math.nan
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
            bar.last = -math.inf
        bar.update(step + 1, last)
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
    stats = {"train_loss": last, "eval_mse": mse01, "psnr": -10 * math.log10(max(mse01, 1e-12)), "images": float(m), "seconds": time.perf_counter() - bar.t0}
    bar.write(f"done in {stats['seconds']:.0f}s: training-set PSNR {stats['psnr']:.1f} dB")
    return stats


def train_prior_generator(
    out: Optional[str] = "checkpoints/dcgan_digits32.pt",
    dataset: PriorDataset = "digits",
    image_size: int = 32,
    channels: Optional[int] = None,
    z_dim: int = 32,
    ngf: int = 16,
    crops_per_photo: int = 32,
    crop_seed: int = 1,
    steps: int = 600,
    batch_size: int = 64,
    seed: int = 0,
    log_every: int = 0,
    progress: bool = True,
    name: Optional[str] = None,
    **_: object,
) -> DCGANGenerator:
    """Build a DCGAN, fit it to the PUBLIC pool of ``dataset`` and (when ``out``) save it under registry ``name``."""
    training = public_training_set(dataset, image_size, channels, crops_per_photo, crop_seed)
    torch.manual_seed(seed)
    generator = DCGANGenerator(resolution=image_size, z_dim=z_dim, ngf=ngf, img_channels=training.shape[1])
    stats = fit_generator_glo(generator, training, steps=steps, batch_size=batch_size, seed=seed, log_every=log_every, progress=progress)
    generator.training_stats = stats
    if out:
        from .registry import save_generator

        save_generator(generator, out, name=name or f"dcgan_{dataset if dataset == 'digits' else 'photos'}{image_size}")
    return generator.eval()


def train_digits_generator(out: Optional[str] = "checkpoints/dcgan_digits32.pt", **kwargs: Any) -> DCGANGenerator:
    """The ``dcgan_digits32`` prior (public digits); ``kwargs`` override :func:`prior_recipe`."""
    return train_prior_generator(out, name="dcgan_digits32", **{**prior_recipe("dcgan_digits32"), **kwargs})


def train_photos_generator(out: Optional[str] = "checkpoints/dcgan_photos32_public.pt", **kwargs: Any) -> DCGANGenerator:
    """The ``dcgan_photos32`` prior (PUBLIC photographs); ``kwargs`` override :func:`prior_recipe`."""
    return train_prior_generator(out, name="dcgan_photos32", **{**prior_recipe("dcgan_photos32"), **kwargs})
