"""Generative image priors: StyleGAN2(-ADA) and DCGAN, a timm-style registry, safe checkpoint loaders."""
from .build import GenerativeOutput, build_generator, generator_resolution, generator_to_unit, pooling_factor
from .dcgan import DCGANGenerator
from .loaders import (
    PersistentRecord,
    RestrictedUnpickler,
    UnsafeCheckpointError,
    filter_state_dict,
    load_generator_state,
    load_official_pickle,
    load_stylegan2_pkl,
)
from .registry import GeneratorConfig, create_generator, get_generator_config, list_generators, register_generator, save_generator
from .stylegan2 import StyleGAN2Generator

__all__ = [
    "build_generator",
    "GenerativeOutput",
    "generator_resolution",
    "generator_to_unit",
    "pooling_factor",
    "StyleGAN2Generator",
    "DCGANGenerator",
    "GeneratorConfig",
    "create_generator",
    "get_generator_config",
    "list_generators",
    "register_generator",
    "save_generator",
    "PersistentRecord",
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "filter_state_dict",
    "load_generator_state",
    "load_official_pickle",
    "load_stylegan2_pkl",
]
