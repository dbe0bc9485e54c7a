"""DCGAN generator (Radford et al. 2016) at 32x32 and 64x64, the generator GIML meta-learns (Jeon et al. 2021).

Layout: ``main`` is an ``nn.Sequential`` of ConvTranspose2d / BatchNorm2d / ReLU blocks ending in Tanh,
the layout of the PyTorch DCGAN example, so its 64x64 checkpoints (``nz=100, ngf=64``) load by name.
``z`` ``[N, z_dim]`` -> image ``[N, img_channels, R, R]`` in ``[-1, 1]``.

Attacks keep the generator in eval mode (BatchNorm uses its running statistics), so images of a batch
do not interact and a per-image copy behaves like the shared generator.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["DCGANGenerator"]


class DCGANGenerator(nn.Module):
    """DCGAN generator.

    Args:
        resolution: 32 or 64.
        z_dim: latent size (``nz``).
        ngf: base width; the first block has ``ngf * 4`` (32x32) or ``ngf * 8`` (64x64) channels.
        img_channels: output channels.
        batchnorm: BatchNorm after each transposed convolution but the last (DCGAN default).
    """

    output_range = (-1.0, 1.0)
    latent_spaces = ("z",)

    def __init__(self, resolution: int = 32, z_dim: int = 100, ngf: int = 64, img_channels: int = 3, batchnorm: bool = True) -> None:
        super().__init__()
        if resolution not in (32, 64):
            raise ValueError(f"DCGAN resolution must be 32 or 64, got {resolution}")
        self.resolution, self.img_resolution = resolution, resolution
        self.z_dim, self.ngf, self.img_channels = z_dim, ngf, img_channels
        self.init_kwargs = dict(resolution=resolution, z_dim=z_dim, ngf=ngf, img_channels=img_channels, batchnorm=batchnorm)
        mults = [4, 2, 1] if resolution == 32 else [8, 4, 2, 1]
        layers: list[nn.Module] = []
        in_ch = z_dim
        for i, m in enumerate(mults):
            out_ch = ngf * m
            stride, pad = (1, 0) if i == 0 else (2, 1)
            layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, stride, pad, bias=not batchnorm))
            layers.append(nn.BatchNorm2d(out_ch) if batchnorm else nn.Identity())
            layers.append(nn.ReLU(True))
            in_ch = out_ch
        layers.append(nn.ConvTranspose2d(in_ch, img_channels, 4, 2, 1, bias=False))
        layers.append(nn.Tanh())
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN initialisation: conv weights N(0, 0.02), BN weights N(1, 0.02), biases 0 (global RNG)."""
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim == 2:
            z = z[:, :, None, None]
        return self.main(z)

    # ------------------------------------------------------------------ latent-space API used by GIAS/GIML
    def latent_shape(self, space: str = "z") -> tuple[int, ...]:
        if space != "z":
            raise ValueError(f"DCGAN has only the 'z' latent space, got {space!r}")
        return (self.z_dim,)

    @torch.no_grad()
    def sample_latents(self, n: int, space: str = "z", generator: Optional[torch.Generator] = None, truncation_psi: float = 1.0, c: Optional[Tensor] = None) -> Tensor:
        self.latent_shape(space)
        z = torch.randn([n, self.z_dim], generator=generator)
        return z.to(next(self.parameters()).device) * float(truncation_psi)

    def to_synthesis_input(self, latents: Tensor, space: str = "z", c: Optional[Tensor] = None) -> Tensor:
        self.latent_shape(space)
        return latents

    def synthesis_network(self) -> nn.Module:
        return self
