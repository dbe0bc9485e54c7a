"""StyleGAN2 numerics against a slow reference written from the paper's equations (Karras et al., CVPR 2020,
"Analyzing and Improving the Image Quality of StyleGAN", Sec. 2.2, Eqs. 1-3):

    style        s_i        = A(w)_i                       (affine: w_dim -> in_channels, equalised lr, bias 1)
    modulate     w'_ijk     = s_i * w_ijk                  (i: input channel, j: output channel, k: tap)
    demodulate   w''_ijk    = w'_ijk / sqrt(sum_{i,k} w'_ijk^2 + eps)
    then, per sample: convolution with w'', noise * strength, bias, leaky ReLU(0.2) * sqrt(2).

The reference loops over samples and output channels with explicit sums (no grouped convolution, no fused
kernel), and upsamples by zero insertion + the [1, 3, 3, 1] FIR blur, the official generic path, instead of
our transposed convolution. Small sizes: fast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_gi.generators.stylegan2 import SynthesisLayer, ToRGBLayer


def reference_affine(layer: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Equalised-lr fully connected layer: w @ (W * 1/sqrt(w_dim))^T + b (lr multiplier 1)."""
    weight = layer.weight.double() / math.sqrt(layer.weight.shape[1])
    return w.double() @ weight.t() + layer.bias.double()


def correlate(x: torch.Tensor, kernel: torch.Tensor, pad: int) -> torch.Tensor:
    """out[o, y, x] = sum_{i, a, b} xpad[i, y + a, x + b] * kernel[o, i, a, b], by explicit sums."""
    c, h, w = x.shape
    o, _, kh, kw = kernel.shape
    xp = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=x.dtype)
    xp[:, pad : pad + h, pad : pad + w] = x
    oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = torch.zeros(o, oh, ow, dtype=x.dtype)
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a : a + oh, b : b + ow]  # [I, oh, ow]
            out += torch.einsum("oi,ihw->ohw", kernel[:, :, a, b], patch)
    return out


def fir_upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Zero insertion (x at even positions), pad (2, 1), blur with outer([1,3,3,1]) / 64 * 4: [C, 2H, 2W]."""
    c, h, w = x.shape
    up = torch.zeros(c, 2 * h, 2 * w, dtype=x.dtype)
    up[:, ::2, ::2] = x
    f1 = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype)
    f = torch.outer(f1, f1) / f1.sum() ** 2 * 4.0
    kernel = torch.zeros(c, c, 4, 4, dtype=x.dtype)
    for i in range(c):
        kernel[i, i] = f
    padded = torch.zeros(c, 2 * h + 3, 2 * w + 3, dtype=x.dtype)
    padded[:, 2 : 2 + 2 * h, 2 : 2 + 2 * w] = up
    return correlate(padded, kernel, pad=0)


def reference_synthesis_layer(layer: SynthesisLayer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Modulate, demodulate, convolve per sample (upsampling first for conv0), noise, bias, lrelu * sqrt(2)."""
    styles = reference_affine(layer.affine, w)  # [N, I]
    weight = layer.weight.double()  # [O, I, 3, 3]
    outs = []
    for n in range(x.shape[0]):
        wm = weight * styles[n].view(1, -1, 1, 1)  # modulate: scale input channel i by s_i
        wd = wm / torch.sqrt(wm.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)  # demodulate per output channel
        xin = x[n].double()
        if layer.up == 2:
            # official generic path: FIR upsampling with padding (3, 2) then a true convolution (flipped kernel)
            xin = fir_upsample2x_pad(xin)
            y = correlate(xin, wd.flip([2, 3]), pad=0)
        else:
            y = correlate(xin, wd, pad=1)
        y = y + layer.noise_const.double() * layer.noise_strength.double()
        y = y + layer.bias.double().view(-1, 1, 1)
        outs.append(F.leaky_relu(y, 0.2) * math.sqrt(2.0))
    return torch.stack(outs)


def fir_upsample2x_pad(x: torch.Tensor) -> torch.Tensor:
    """Upsample 2x (zero insertion + FIR, gain 4) with the extra border of a following 3x3 valid convolution:
    pads (3, 2) instead of (2, 1), giving [C, 2H + 2, 2W + 2]."""
    c, h, w = x.shape
    up = torch.zeros(c, 2 * h, 2 * w, dtype=x.dtype)
    up[:, ::2, ::2] = x
    f1 = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype)
    f = torch.outer(f1, f1) / f1.sum() ** 2 * 4.0
    kernel = torch.zeros(c, c, 4, 4, dtype=x.dtype)
    for i in range(c):
        kernel[i, i] = f
    padded = torch.zeros(c, 2 * h + 5, 2 * w + 5, dtype=x.dtype)
    padded[:, 3 : 3 + 2 * h, 3 : 3 + 2 * w] = up
    return correlate(padded, kernel, pad=0)


def _layer(up: int, res: int, seed: int = 0) -> SynthesisLayer:
    torch.manual_seed(seed)
    layer = SynthesisLayer(in_channels=3, out_channels=4, w_dim=5, resolution=res, up=up).eval()
    with torch.no_grad():  # non-trivial values everywhere (the official init has zero bias / noise strength)
        layer.bias.normal_()
        layer.noise_strength.fill_(0.7)
        layer.affine.bias.normal_(1.0, 0.3)
    return layer


def test_modulated_conv_layer_matches_paper_equations():
    layer = _layer(up=1, res=6)
    x, w = torch.randn(2, 3, 6, 6), torch.randn(2, 5)
    with torch.no_grad():
        ours = layer(x, w, noise_mode="const").double()
    ref = reference_synthesis_layer(layer, x, w)
    assert ours.shape == ref.shape == (2, 4, 6, 6)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), float((ours - ref).abs().max())
    # demodulation makes the layer invariant to the scale of the styles (Eq. 3)
    with torch.no_grad():
        layer.affine.weight.mul_(3.0)
        layer.affine.bias.mul_(3.0)
        scaled = layer(x, w, noise_mode="const").double()
    assert torch.allclose(scaled, ours, atol=1e-4, rtol=1e-4)


def test_upsampling_modulated_conv_matches_generic_fir_path():
    layer = _layer(up=2, res=8, seed=1)
    x, w = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    with torch.no_grad():
        ours = layer(x, w, noise_mode="const").double()
    ref = reference_synthesis_layer(layer, x, w)
    assert ours.shape == ref.shape == (2, 4, 8, 8)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), float((ours - ref).abs().max())


def test_fir_upsampling_preserves_constant_images():
    """The blur kernel with gain 4 after zero insertion keeps a constant image constant (away from borders)."""
    x = torch.full((1, 4, 4), 2.5, dtype=torch.float64)
    up = fir_upsample2x(x)
    assert up.shape == (1, 8, 8)
    assert torch.allclose(up[:, 1:-1, 1:-1], torch.full((1, 6, 6), 2.5, dtype=torch.float64))


def test_torgb_is_modulated_without_demodulation():
    torch.manual_seed(2)
    layer = ToRGBLayer(in_channels=4, out_channels=3, w_dim=5).eval()
    with torch.no_grad():
        layer.bias.normal_()
    x, w = torch.randn(2, 4, 5, 5), torch.randn(2, 5)
    with torch.no_grad():
        ours = layer(x, w).double()
    styles = reference_affine(layer.affine, w) / math.sqrt(4)  # 1x1 kernel: weight gain 1/sqrt(in * 1 * 1)
    ref = torch.stack(
        [correlate(x[n].double(), layer.weight.double() * styles[n].view(1, -1, 1, 1), pad=0) + layer.bias.double().view(-1, 1, 1) for n in range(2)]
    )
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
