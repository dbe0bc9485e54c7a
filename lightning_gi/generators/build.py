"""Generator plumbing shared by the generative attacks (GIAS, GIML).

:func:`build_generator` turns a registry name (+ file) into a frozen-weight-ready module;
:class:`GenerativeOutput` maps a generator's output to the victim's input space (to [0, 1], integer
average pooling, channel conversion, normalisation).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import resolve_checkpoint

__all__ = ["build_generator", "GenerativeOutput", "generator_to_unit", "pooling_factor", "generator_resolution"]


def build_generator(
    generator: Union[str, nn.Module],
    pretrained: bool = True,
    checkpoint_path: Optional[str] = None,
    generator_kwargs: Optional[dict[str, Any]] = None,
    train_if_missing: bool = False,
) -> nn.Module:
    """A generator module from a registry name (+ file) or as given.

    ``train_if_missing``: a project-trained prior (``dcgan_digits32``, ``dcgan_photos32``: registry entries with a
    training recipe) whose file is absent is fitted first, on the PUBLIC pool only (:mod:`.train_dcgan`), and
    written where the checkpoint search finds it (:func:`~lightning_gi.checkpoints.resolve_checkpoint`).
    """
    if isinstance(generator, nn.Module):
        return generator
    from .registry import create_generator, generator_file, get_generator_config, list_generators

    cfg = get_generator_config(generator)
    wanted = generator_file(generator, pretrained, checkpoint_path)
    if wanted is not None and train_if_missing and resolve_checkpoint(wanted, if_missing="none") is None:
        recipe = cfg.extra.get("recipe")
        if recipe is None:
            trainable = [n for n in list_generators() if get_generator_config(n).extra.get("recipe")]
            raise ValueError(f"train_generator_if_missing only applies to the generators trained here ({', '.join(trainable)}), not {generator!r}")
        from .train_dcgan import train_prior_generator

        out = resolve_checkpoint(wanted, if_missing="destination")
        dataset = recipe.get("dataset")
        warnings.warn(
            f"generator file {wanted} not found: fitting it now to the PUBLIC {dataset} (progress on stderr; "
            f"beforehand: lightning-gi train-dcgan --dataset {dataset} --out {out})"
        )
        train_prior_generator(out=str(out), name=cfg.name, **{**recipe, **(generator_kwargs or {})})
        wanted = str(out)
    return create_generator(generator, checkpoint_path=wanted, **(generator_kwargs or {}))


def generator_resolution(generator: nn.Module) -> Optional[int]:
    """The generator's output size in pixels when it declares one (``img_resolution``/``resolution``)."""
    for name in ("img_resolution", "resolution"):
        value = getattr(generator, name, None)
        if isinstance(value, int):
            return value
    return None


def generator_to_unit(raw: Tensor, output_range: Sequence[float] = (-1.0, 1.0)) -> Tensor:
    lo, hi = float(output_range[0]), float(output_range[1])
    return (raw - lo) / (hi - lo)


def pooling_factor(generator_resolution: int, victim_resolution: int) -> int:
    """Integer average-pooling factor from the generator's output size to the victim's input size.

    GIAS's ImageNet setting (the authors' ``rec_mult.py``) average-pools a 512 px StyleGAN2 by 512 // 64 = 8
    to the 64 px victim; only integer factors are pooled (anything else would resample the image)."""
    g, v = int(generator_resolution), int(victim_resolution)
    if v < 1 or g < v or g % v:
        raise ValueError(
            f"the generator's {g} px output cannot be average-pooled to the victim's {v} px input: "
            f"the generator resolution must be an integer multiple of the victim's"
        )
    return g // v


class GenerativeOutput(nn.Module):
    """Generator output -> victim input: to [0, 1], average pooling by an integer factor, normalise.

    ``generator_resolution`` (when known) is checked against the victim's size at construction, so a
    mismatch fails before any optimisation step."""

    def __init__(
        self,
        output_range: Sequence[float],
        image_shape: Sequence[int],
        mean: Tensor,
        std: Tensor,
        generator_resolution: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.output_range = tuple(float(v) for v in output_range)
        self.image_shape = tuple(int(v) for v in image_shape)
        self.register_buffer("mean", mean.clone().float(), persistent=False)
        self.register_buffer("std", std.clone().float(), persistent=False)
        if generator_resolution is not None:
            pooling_factor(generator_resolution, self.image_shape[1])
            pooling_factor(generator_resolution, self.image_shape[2])

    def forward(self, raw: Tensor) -> Tensor:
        c, h, w = self.image_shape
        x = generator_to_unit(raw, self.output_range)
        if x.shape[1] != c:
            if x.shape[1] == 3 and c == 1:
                x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
            elif x.shape[1] == 1 and c == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"generator gives {x.shape[1]} channels, the victim takes {c}")
        if tuple(x.shape[-2:]) != (h, w):
            kh, kw = pooling_factor(x.shape[-2], h), pooling_factor(x.shape[-1], w)
            x = F.avg_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw))
        return (x - self.mean.to(x)) / self.std.to(x)
