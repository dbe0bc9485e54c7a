"""timm-style generator registry: ``create_generator(name, pretrained=False, checkpoint_path=None, **kwargs)``.

Each variant has a :class:`GeneratorConfig` (architecture, constructor arguments, resolution, latent sizes,
output range, the expected file name and where the file comes from). Nothing is downloaded: ``pretrained=True``
resolves the expected file through :func:`lightning_gi.checkpoints.resolve_checkpoint` (``./checkpoints``,
``$LIGHTNING_GI_CHECKPOINTS``, ...) and raises :class:`~lightning_gi.checkpoints.MissingCheckpointError` naming
it when absent. Official StyleGAN2-ADA ``.pkl`` files go through the restricted unpickler
(:func:`~lightning_gi.generators.loaders.load_stylegan2_pkl`); ``.pt``/``.ckpt``/``.safetensors`` files through
``weights_only`` loading and :func:`~lightning_gi.generators.loaders.filter_state_dict`.

>>> g = create_generator("dcgan32")                                  # random init
>>> g = create_generator("stylegan2_ffhq256", pretrained=True)       # needs ffhq-res256-mirror-paper256-noaug.pkl
>>> g = create_generator("stylegan2", img_resolution=64, checkpoint_path="my_imagenet64.pkl")
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..checkpoints import CorruptCheckpointError, resolve_checkpoint
from ..files import save_atomic
from .dcgan import DCGANGenerator
from .loaders import filter_state_dict, load_stylegan2_pkl, read_generator_file
from .stylegan2 import StyleGAN2Generator

__all__ = ["GeneratorConfig", "create_generator", "generator_file", "list_generators", "get_generator_config", "register_generator", "save_generator", "ARCHITECTURES"]

NVIDIA_CDN = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"stylegan2": StyleGAN2Generator, "dcgan": DCGANGenerator}


@dataclass(frozen=True)
class GeneratorConfig:
    """Per-variant (pretrained) configuration, as timm's ``pretrained_cfg``."""

    name: str
    architecture: str  # key of ARCHITECTURES
    kwargs: dict[str, Any]  # constructor arguments
    resolution: int
    z_dim: int
    w_dim: Optional[int] = None  # StyleGAN2 only
    c_dim: int = 0
    output_range: tuple[float, float] = (-1.0, 1.0)
    file: Optional[str] = None  # expected file name (searched in ./checkpoints etc.)
    source: str = ""  # where the file comes from
    dataset: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_pretrained(self) -> bool:
        return self.file is not None


def _sg2(res: int, z: int = 512, w: int = 512, c: int = 0, channel_base: int = 32768, channel_max: int = 512, map_layers: int = 8, fp16: int = 4, clamp: Optional[float] = 256) -> dict[str, Any]:
    return dict(
        z_dim=z,
        c_dim=c,
        w_dim=w,
        img_resolution=res,
        img_channels=3,
        mapping_kwargs=dict(num_layers=map_layers),
        synthesis_kwargs=dict(channel_base=channel_base, channel_max=channel_max, num_fp16_res=fp16, conv_clamp=clamp),
    )


_REGISTRY: dict[str, GeneratorConfig] = {}


def register_generator(cfg: GeneratorConfig) -> GeneratorConfig:
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; known: {sorted(ARCHITECTURES)}")
    _REGISTRY[cfg.name] = cfg
    return cfg


def _official(name: str, file: str, res: int, dataset: str, sub: str = "", **kw: Any) -> None:
    z = kw.pop("z", 512)
    c = kw.get("c", 0)
    register_generator(
        GeneratorConfig(
            name=name,
            architecture="stylegan2",
            kwargs=_sg2(res, z=z, **kw),
            resolution=res,
            z_dim=z,
            w_dim=512,
            c_dim=c,
            file=file,
            source=NVIDIA_CDN + sub + file,
            dataset=dataset,
            notes="NVIDIA StyleGAN2-ADA (stylegan2-ada-pytorch) official pickle; the architecture is read from the file",
        )
    )


# ---- generic, randomly initialised architectures (no file)
register_generator(GeneratorConfig("stylegan2", "stylegan2", _sg2(64, fp16=0, clamp=None), 64, 512, 512, notes="StyleGAN2 generator, random init; pass img_resolution=..., checkpoint_path=..."))
register_generator(GeneratorConfig("dcgan32", "dcgan", dict(resolution=32, z_dim=100, ngf=64), 32, 100, notes="DCGAN 32x32, random init"))
register_generator(GeneratorConfig("dcgan64", "dcgan", dict(resolution=64, z_dim=100, ngf=64), 64, 100, notes="DCGAN 64x64 (PyTorch DCGAN example layout), random init"))

# ---- public StyleGAN2-ADA releases (stylegan2-ada-pytorch)
_official("stylegan2_ffhq1024", "ffhq.pkl", 1024, "FFHQ 1024x1024")
_official("stylegan2_ffhq256", "ffhq-res256-mirror-paper256-noaug.pkl", 256, "FFHQ 256x256", sub="transfer-learning-source-nets/", channel_base=16384)
_official("stylegan2_ffhq512", "ffhq-res512-mirror-stylegan2-noaug.pkl", 512, "FFHQ 512x512", sub="transfer-learning-source-nets/")
_official("stylegan2_celebahq256", "celebahq-res256-mirror-paper256-kimg100000-ada-target0.5.pkl", 256, "CelebA-HQ 256x256", sub="transfer-learning-source-nets/", channel_base=16384)
_official("stylegan2_metfaces1024", "metfaces.pkl", 1024, "MetFaces 1024x1024")
_official("stylegan2_afhqcat512", "afhqcat.pkl", 512, "AFHQ cat 512x512")
_official("stylegan2_afhqdog512", "afhqdog.pkl", 512, "AFHQ dog 512x512")
_official("stylegan2_afhqwild512", "afhqwild.pkl", 512, "AFHQ wild 512x512")
_official("stylegan2_cifar10", "cifar10.pkl", 32, "CIFAR-10 32x32 (class-conditional, c_dim=10)", c=10, map_layers=2)

# ---- ImageNet (GIAS paper setting). NVIDIA released no ImageNet model. The GIAS authors (ml-postech, rec_mult.py)
# used a 512x512 StyleGAN2 trained on ImageNet (16 w's) and AVERAGE-POOLED its output by 512 // 64 = 8 to the
# 64x64 victim; their file is not distributed in a format read here. Any StyleGAN2-ADA pickle works: put it in
# checkpoints/ under the variant's file name (or pass checkpoint_path); the architecture is read from the file,
# the values below are only the expected defaults. GIAS pools any generator resolution that is an integer
# multiple of the victim's (lightning_gi.generators.build.pooling_factor).
register_generator(
    GeneratorConfig(
        "stylegan2_imagenet512",
        "stylegan2",
        _sg2(512),
        512,
        512,
        512,
        file="stylegan2_imagenet512.pkl",
        source="train with NVlabs/stylegan2-ada-pytorch on ImageNet at 512x512 (the GIAS authors' resolution); no official download",
        dataset="ImageNet 512x512",
        notes="the GIAS (Jeon et al. 2021) ImageNet setting: 16 w's, output average-pooled by 8 to the 64x64 victim",
    )
)
register_generator(
    GeneratorConfig(
        "stylegan2_imagenet64",
        "stylegan2",
        _sg2(64, channel_base=16384),
        64,
        512,
        512,
        file="stylegan2_imagenet64.pkl",
        source="train with NVlabs/stylegan2-ada-pytorch on ImageNet at 64x64; no official download",
        dataset="ImageNet 64x64",
        notes="a 64x64 ImageNet StyleGAN2 (10 w's), used without pooling on a 64x64 victim; NOT the GIAS authors' "
        "setting (they pooled a 512x512 model by 8: stylegan2_imagenet512)",
    )
)

# ---- generators produced by this project (train_dcgan / GIML); files hold their own spec.
# The dcgan_* priors below are fitted to the PUBLIC pool of the bundled data only (lightning_gi.victim.data),
# disjoint from the images victims' batches are cut from; extra["recipe"] is how train_dcgan makes the file.
register_generator(
    GeneratorConfig(
        "dcgan_digits32",
        "dcgan",
        dict(resolution=32, z_dim=32, ngf=16, img_channels=1),
        32,
        32,
        file="dcgan_digits32.pt",
        source="lightning-gi train-dcgan --dataset digits (writes checkpoints/dcgan_digits32.pt; about 12 s of CPU on one thread)",
        dataset="scikit-learn digits, PUBLIC pool (index 4 mod 5; disjoint from the attacked digits), 32x32 grey",
        notes="DCGAN fitted by latent optimisation to the public digits; the GIAS demo generator (same distribution as the private digits, disjoint samples)",
        extra={"recipe": {"dataset": "digits", "image_size": 32, "channels": 1, "z_dim": 32, "ngf": 16, "steps": 600, "batch_size": 64}},
    )
)
register_generator(
    GeneratorConfig(
        "dcgan_photos32",
        "dcgan",
        dict(resolution=32, z_dim=64, ngf=32),
        32,
        64,
        file="dcgan_photos32_public.pt",
        source="lightning-gi train-dcgan --dataset photographs (writes checkpoints/dcgan_photos32_public.pt; about 1 min of CPU on one thread)",
        dataset="bundled photographs, PUBLIC pool (textures, microscopy, astronomy), random crops + mirror images, 32x32",
        notes="DCGAN fitted by latent optimisation to the public photographs: a prior from ANOTHER distribution than the "
        "private photographs (mismatched-prior studies). The file name changed when the prior moved to the public pool, "
        "so an old dcgan_photos32.pt (fitted to crops of the attacked photographs) is never picked up",
        extra={"recipe": {"dataset": "photographs", "image_size": 32, "channels": 3, "z_dim": 64, "ngf": 32, "steps": 800, "batch_size": 64}},
    )
)
register_generator(
    GeneratorConfig(
        "dcgan_giml32",
        "dcgan",
        dict(resolution=32, z_dim=64, ngf=32),
        32,
        64,
        file="giml_dcgan32.pt",
        source="written by the GIML attack (generator_out), meta-learned from gradients only",
        dataset="whatever the observed clients held",
    )
)


def list_generators(pretrained: bool = False) -> list[str]:
    """Registered variant names (only those with a pretrained file when ``pretrained``)."""
    return sorted(n for n, c in _REGISTRY.items() if c.has_pretrained or not pretrained)


def get_generator_config(name: str) -> GeneratorConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown generator {name!r}; available: {', '.join(list_generators())}") from None


def _build(architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return ARCHITECTURES[architecture](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for a {architecture} generator: {err}") from None


def generator_file(name: str, pretrained: bool = True, checkpoint_path: Optional[str | os.PathLike] = None) -> Optional[str]:
    """The file generator ``name`` loads: ``checkpoint_path`` when given, else the variant's expected file when
    ``pretrained`` (None: random init). Locate it with :func:`lightning_gi.checkpoints.resolve_checkpoint`."""
    cfg = get_generator_config(name)
    if checkpoint_path:  # None or "": no explicit file
        return os.fspath(checkpoint_path)
    if not pretrained:
        return None
    if cfg.file is None:
        raise ValueError(f"generator {name!r} has no pretrained file; pass checkpoint_path=... or use one of {list_generators(pretrained=True)}")
    return cfg.file


def generator_file_purpose(name: str, user: str = "") -> str:
    """What a generator file is for, in :class:`~lightning_gi.checkpoints.MissingCheckpointError` messages."""
    cfg = get_generator_config(name)
    return f"generator '{name}'{' for ' + user if user else ''} ({cfg.source or 'see checkpoints/README.md'})"


def create_generator(name: str, pretrained: bool = False, checkpoint_path: Optional[str | os.PathLike] = None, **kwargs: Any) -> nn.Module:
    """Build generator ``name``; load its pretrained file (``pretrained=True``) or ``checkpoint_path``.

    ``kwargs`` override the variant's constructor arguments (for a ``.pkl`` they override the file's
    ``_init_kwargs``). The returned module is in eval mode and carries ``pretrained_cfg`` (the config) and
    ``checkpoint_file`` (the path loaded, or None).
    """
    cfg = get_generator_config(name)
    path = generator_file(name, pretrained, checkpoint_path)
    if path is not None:
        what = generator_file_purpose(name)
        resolved = resolve_checkpoint(path, what)
        if resolved.suffix == ".pkl":
            if cfg.architecture != "stylegan2":
                raise CorruptCheckpointError(f"'{resolved}' is a pickle but {name!r} is a {cfg.architecture}: only official StyleGAN2-ADA pickles are read")
            model = load_stylegan2_pkl(resolved, **kwargs)
        else:
            state, spec = read_generator_file(resolved, what)
            args = dict(cfg.kwargs)
            architecture = cfg.architecture
            if spec is not None:
                architecture = spec.get("architecture", architecture)
                args.update(spec.get("kwargs") or {})
            args.update(kwargs)
            model = _build(architecture, args)
            model.load_state_dict(filter_state_dict(state, model, source=f"'{resolved}'"), strict=True)
        file = str(resolved)
    else:
        args = dict(cfg.kwargs)
        args.update(kwargs)
        model = _build(cfg.architecture, args)
        file = None
    model.pretrained_cfg = cfg
    model.checkpoint_file = file
    return model.eval()


def save_generator(model: nn.Module, path: str | os.PathLike, name: Optional[str] = None) -> Path:
    """Write ``{"state_dict", "generator": {"architecture", "kwargs", "name"}}`` (weights_only readable)."""
    architecture = next((k for k, cls in ARCHITECTURES.items() if isinstance(model, cls)), None)
    if architecture is None:
        raise TypeError(f"save_generator supports {sorted(ARCHITECTURES)}, got {type(model).__name__}")
    spec = {"architecture": architecture, "kwargs": dict(getattr(model, "init_kwargs", {})), "name": name or architecture}
    path = Path(path)
    save_atomic({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "generator": spec}, path)
    return path
