"""StyleGAN2(-ADA) generator written for lightning_gi, with NVIDIA's parameter and buffer names.

The module tree mirrors NVlabs' ``stylegan2-ada-pytorch`` ``training/networks.py`` so that the tensors of an
official ``.pkl`` (read without executing code by :mod:`lightning_gi.generators.loaders`) load into it with
``load_state_dict(strict=True)``:

* ``mapping.fc{i}.weight|bias``, ``mapping.embed.*`` (conditional models only), buffer ``mapping.w_avg``;
* ``synthesis.b4.const`` ``[C, 4, 4]``; per block ``synthesis.b{res}.conv0`` (upsampling, res > 4) and
  ``.conv1`` with ``weight [out, in, 3, 3]``, ``bias``, ``noise_strength`` (scalar), ``affine.weight [in, w_dim]``,
  ``affine.bias`` and buffers ``noise_const [res, res]``, ``resample_filter [4, 4]``;
  ``synthesis.b{res}.torgb.weight [img_channels, C, 1, 1]``, ``.bias``, ``.affine.*``; ``synthesis.b{res}
  .resample_filter``; ``synthesis.b{res}.skip.weight`` only in the ``resnet`` architecture.

Runtime semantics (as in the official code; weights are stored unscaled):

* equalised learning rate: a fully connected layer multiplies its weight by ``lr_mul / sqrt(fan_in)`` and its
  bias by ``lr_mul`` at run time (mapping network: ``lr_mul = 0.01``);
* ``z`` is normalised by its second moment; the mapping output is broadcast to ``num_ws = 2 log2(res) - 2``
  latents; truncation lerps ``w_avg -> w`` by ``psi`` on the first ``truncation_cutoff`` latents;
* modulated (and, except toRGB, demodulated) 3x3 convolutions, grouped per sample ("fused modconv");
  upsampling by a transposed stride-2 convolution followed by the ``[1, 3, 3, 1]`` FIR filter;
* per-layer noise: ``noise_mode`` ``"random"`` (fresh Gaussian noise), ``"const"`` (the stored ``noise_const``
  buffers, deterministic; the default of our attacks) or ``"none"``;
* leaky ReLU 0.2 with gain sqrt(2), optional ``conv_clamp``; output image in roughly ``[-1, 1]`` (not clamped).

float16 layers (``num_fp16_res`` of the official training config) are run in float32 here: results match
the official float32 path, and differ from its mixed-precision path only by float16 rounding.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "StyleGAN2Generator",
    "MappingNetwork",
    "SynthesisNetwork",
    "SynthesisBlock",
    "SynthesisLayer",
    "ToRGBLayer",
    "FullyConnectedLayer",
    "Conv2dLayer",
    "NOISE_MODES",
    "LATENT_SPACES",
    "setup_filter",
    "upfirdn2d",
    "modulated_conv2d",
]

NOISE_MODES = ("random", "const", "none")
LATENT_SPACES = ("z", "w", "w+")
_LRELU_GAIN = math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------- primitives
def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def bias_act(x: Tensor, b: Optional[Tensor], act: str = "linear", gain: Optional[float] = None, clamp: Optional[float] = None) -> Tensor:
    """Bias, activation, gain, clamp (in that order), on channel dim 1."""
    if b is not None:
        x = x + b.reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
        gain = _LRELU_GAIN if gain is None else gain
    elif act == "relu":
        x = F.relu(x)
        gain = _LRELU_GAIN if gain is None else gain
    elif act == "linear":
        gain = 1.0 if gain is None else gain
    else:
        raise ValueError(f"unsupported activation {act!r}")
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def setup_filter(f: Sequence[float] = (1, 3, 3, 1)) -> Tensor:
    """The official ``upfirdn2d.setup_filter`` for a short 1-D filter: outer product, normalised to sum 1."""
    t = torch.as_tensor(list(f), dtype=torch.float32)
    if t.ndim == 1 and t.numel() < 8:
        t = torch.outer(t, t)
    return t / t.sum()


def upfirdn2d(x: Tensor, f: Tensor, up: int = 1, padding: Sequence[int] = (0, 0, 0, 0), gain: float = 1.0) -> Tensor:
    """Upsample (zero insertion), pad/crop ``[x0, x1, y0, y1]``, FIR-filter each channel (2-D filter)."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    px0, px1, py0, py1 = padding
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    f = (f * gain).to(x.dtype).flip([0, 1])
    weight = f[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, weight, groups=c)


def upsample2d(x: Tensor, f: Tensor, up: int = 2) -> Tensor:
    fw = f.shape[-1]
    p = [(fw + up - 1) // 2, (fw - up) // 2, (fw + up - 1) // 2, (fw - up) // 2]
    return upfirdn2d(x, f, up=up, padding=p, gain=up * up)


def conv2d_resample(x: Tensor, w: Tensor, f: Optional[Tensor] = None, up: int = 1, padding: int = 0, groups: int = 1, flip_weight: bool = True) -> Tensor:
    """2-D convolution with optional 2x upsampling, as the official ``conv2d_resample`` (down=1 only)."""
    out_channels, in_per_group, kh, kw = w.shape
    px0 = px1 = py0 = py1 = padding
    if up > 1:
        assert f is not None
        fw, fh = f.shape[-1], f.shape[0]
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if up == 1:
        if not flip_weight and (kw > 1 or kh > 1):
            w = w.flip([2, 3])
        return F.conv2d(x, w, padding=[py0, px0], groups=groups)
    if kw == 1 and kh == 1:  # 1x1 kernel with upsampling: convolve first, then upsample
        x = F.conv2d(x, w, groups=groups)
        return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up * up)
    # transposed strided convolution, then the FIR filter
    if groups == 1:
        w = w.transpose(0, 1)
    else:
        w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    px0 -= kw - 1
    px1 -= kw - up
    py0 -= kh - 1
    py1 -= kh - up
    pxt = max(min(-px0, -px1), 0)
    pyt = max(min(-py0, -py1), 0)
    if flip_weight:  # the transposed conv is called with flip_weight = not flip_weight in the official code
        w = w.flip([2, 3])
    x = F.conv_transpose2d(x, w, stride=up, padding=[pyt, pxt], groups=groups)
    return upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up * up)


def modulated_conv2d(
    x: Tensor,
    weight: Tensor,
    styles: Tensor,
    noise: Optional[Tensor] = None,
    up: int = 1,
    padding: int = 0,
    resample_filter: Optional[Tensor] = None,
    demodulate: bool = True,
    flip_weight: bool = True,
) -> Tensor:
    """Per-sample modulated (optionally demodulated) convolution as one grouped convolution."""
    n = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)  # [N, O, I, k, k]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
        w = w * dcoefs.reshape(n, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, padding=padding, groups=n, flip_weight=flip_weight)
    x = x.reshape(n, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x


# ---------------------------------------------------------------------------------------------- layers
class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate: weight * lr_mul / sqrt(in), bias * lr_mul at run time."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear", lr_multiplier: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class Conv2dLayer(nn.Module):
    """Plain equalised-lr convolution (used for the resnet architecture's ``skip``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, activation: str = "linear", up: int = 1, resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: Optional[float] = None) -> None:
        super().__init__()
        self.activation, self.up, self.conv_clamp = activation, up, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = _LRELU_GAIN if activation in ("lrelu", "relu") else 1.0
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        w = self.weight * self.weight_gain
        x = conv2d_resample(x, w.to(x.dtype), f=self.resample_filter, up=self.up, padding=self.padding, flip_weight=(self.up == 1))
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution + noise + bias + leaky ReLU (``conv0`` upsamples by 2)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3, up: int = 1, use_noise: bool = True, activation: str = "lrelu", resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: Optional[float] = None, channels_last: bool = False) -> None:
        super().__init__()
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.activation, self.conv_clamp = activation, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = _LRELU_GAIN if activation in ("lrelu", "relu") else 1.0
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "const", gain: float = 1.0) -> Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device, dtype=x.dtype) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding, resample_filter=self.resample_filter, flip_weight=(self.up == 1))
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated (not demodulated) 1x1 convolution to image channels."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1, conv_clamp: Optional[float] = None, channels_last: bool = False) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: (const | conv0 up) + conv1, toRGB, image skip connections."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int, is_last: bool, architecture: str = "skip", resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: Optional[float] = None, use_fp16: bool = False, fp16_channels_last: bool = False, **layer_kwargs: Any) -> None:
        super().__init__()
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"architecture must be orig/skip/resnet, got {architecture!r}")
        self.in_channels, self.resolution, self.img_channels = in_channels, resolution, img_channels
        self.is_last, self.architecture = is_last, architecture
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, resample_filter=resample_filter, conv_clamp=conv_clamp, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, resample_filter=resample_filter, conv_clamp=conv_clamp, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2, resample_filter=resample_filter)

    def forward(self, x: Optional[Tensor], img: Optional[Tensor], ws: Tensor, noise_mode: str = "const") -> tuple[Tensor, Optional[Tensor]]:
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode)
        elif self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, gain=math.sqrt(0.5))
            x = y + x
        else:
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter)).to(torch.float32)
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws ``[N, num_ws, w_dim]`` -> image ``[N, img_channels, res, res]`` in about [-1, 1].

    ``noise_mode`` (``"const"`` by default) can be set per call or as the attribute ``default_noise_mode``.
    """

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 0, **block_kwargs: Any) -> None:
        super().__init__()
        log2 = int(np.log2(img_resolution)) if img_resolution > 0 else 0
        if img_resolution < 4 or 2**log2 != img_resolution:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.num_fp16_res = num_fp16_res  # kept for the record; we always run in float32
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        self.num_ws = 0
        self.default_noise_mode = "const"
        for res in self.block_resolutions:
            in_ch = channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_ch, channels[res], w_dim=w_dim, resolution=res, img_channels=img_channels, is_last=(res == img_resolution), **block_kwargs)
            self.num_ws += block.num_conv
            if res == img_resolution:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws: Tensor, noise_mode: Optional[str] = None) -> Tensor:
        noise_mode = self.default_noise_mode if noise_mode is None else noise_mode
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws.narrow(1, w_idx, block.num_conv + block.num_torgb), noise_mode=noise_mode)
            w_idx += block.num_conv
        return img


class MappingNetwork(nn.Module):
    """z (and class c) -> w, broadcast to ``num_ws``; ``w_avg`` tracks the mean w during GAN training."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: Optional[int], num_layers: int = 8, embed_features: Optional[int] = None, layer_features: Optional[int] = None, activation: str = "lrelu", lr_multiplier: float = 0.01, w_avg_beta: Optional[float] = 0.995) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", FullyConnectedLayer(features[idx], features[idx + 1], activation=activation, lr_multiplier=lr_multiplier))
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: Optional[Tensor], c: Optional[Tensor] = None, truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None, update_w_avg: bool = False) -> Tensor:
        x = None
        if self.z_dim > 0:
            if z is None or z.ndim != 2 or z.shape[1] != self.z_dim:
                raise ValueError(f"z must be [N, {self.z_dim}], got {None if z is None else tuple(z.shape)}")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            if c is None:
                raise ValueError(f"this generator is conditional (c_dim={self.c_dim}): pass one-hot labels c")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if update_w_avg and self.w_avg_beta is not None:  # only GAN training moves w_avg (never our attacks)
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs w_avg (w_avg_beta is None)")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = torch.cat([self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi), x[:, truncation_cutoff:]], dim=1)
        return x


class StyleGAN2Generator(nn.Module):
    """StyleGAN2(-ADA) generator: ``mapping`` (z -> ws) and ``synthesis`` (ws -> image in about [-1, 1]).

    Args are those of the official ``Generator`` (``_init_kwargs`` of an official pickle):
        z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs (num_layers, lr_multiplier, ...),
        synthesis_kwargs (channel_base, channel_max, num_fp16_res, conv_clamp, architecture, ...).

    Latent spaces for attacks (:meth:`sample_latents`, :meth:`to_synthesis_input`):
        ``"z"`` ``[N, z_dim]`` (through the frozen mapping), ``"w"`` ``[N, w_dim]`` (one w broadcast to every
        layer), ``"w+"`` ``[N, num_ws, w_dim]`` (one w per layer).
    """

    output_range = (-1.0, 1.0)
    latent_spaces = LATENT_SPACES

    def __init__(self, z_dim: int = 512, c_dim: int = 0, w_dim: int = 512, img_resolution: int = 64, img_channels: int = 3, mapping_kwargs: Optional[dict] = None, synthesis_kwargs: Optional[dict] = None) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.init_kwargs = dict(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels, mapping_kwargs=dict(mapping_kwargs or {}), synthesis_kwargs=dict(synthesis_kwargs or {}))
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels, **dict(synthesis_kwargs or {}))
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **dict(mapping_kwargs or {}))

    @property
    def noise_mode(self) -> str:
        return self.synthesis.default_noise_mode

    @noise_mode.setter
    def noise_mode(self, mode: str) -> None:
        if mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {mode!r}")
        self.synthesis.default_noise_mode = mode

    def forward(self, z: Tensor, c: Optional[Tensor] = None, truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None, noise_mode: Optional[str] = None) -> Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode)

    # ------------------------------------------------------------------ latent-space API used by GIAS/GIML
    def latent_shape(self, space: str) -> tuple[int, ...]:
        if space == "z":
            return (self.z_dim,)
        if space == "w":
            return (self.w_dim,)
        if space == "w+":
            return (self.num_ws, self.w_dim)
        raise ValueError(f"latent space must be one of {LATENT_SPACES}, got {space!r}")

    @torch.no_grad()
    def sample_latents(self, n: int, space: str, generator: Optional[torch.Generator] = None, truncation_psi: float = 1.0, c: Optional[Tensor] = None) -> Tensor:
        """Initial latents: z ~ N(0, I); w / w+ = mapping(z) (truncated towards w_avg by ``psi``)."""
        self.latent_shape(space)
        z = torch.randn([n, self.z_dim], generator=generator).to(self.mapping.fc0.weight.device)
        if space == "z":
            return z
        ws = self.mapping(z, c, truncation_psi=truncation_psi)
        return ws[:, 0] if space == "w" else ws

    def to_synthesis_input(self, latents: Tensor, space: str, c: Optional[Tensor] = None) -> Tensor:
        if space == "z":
            return self.mapping(latents, c)
        if space == "w":
            return latents.unsqueeze(1).repeat([1, self.num_ws, 1])
        if space == "w+":
            return latents
        raise ValueError(f"latent space must be one of {LATENT_SPACES}, got {space!r}")

    def synthesis_network(self) -> nn.Module:
        """The part of the generator GIAS copies per image and trains in its parameter phase."""
        return self.synthesis
