"""Gradient distances: values against direct computations, masks/weights semantics, differentiability."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_gi.objectives import (
    CosineDistance,
    SquaredL2Distance,
    TopKCosineDistance,
    WassersteinDistance,
    cosine_distance,
    per_layer_cosine_distance,
    squared_l2,
    topk_cosine_distance,
    topk_magnitude_masks,
    wasserstein,
    wasserstein_l2,
)

SHAPES = [(3, 2), (4,), (2, 2, 2)]


def _pair(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    dummy = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    target = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    return dummy, target


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


# every distance as a callable with the common signature
DISTANCES = {
    "l2": SquaredL2Distance(),
    "cos": CosineDistance(),
    "cos_layer": CosineDistance(per_layer=True),
    "w1": WassersteinDistance(p=1),
    "w2": WassersteinDistance(p=2),
    "w2sq": WassersteinDistance(p=2, squared=True),
    "w1_l2": WassersteinDistance(p=1, l2_weight=0.1),
    "topk": TopKCosineDistance(prune_ratio=0.5),
}


# ---------------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------------
def test_squared_l2_direct():
    d, t = _pair()
    w = [0.5, 2.0, 1.0]
    expected = sum(wi * ((a - b) ** 2).sum() for wi, a, b in zip(w, d, t))
    assert torch.allclose(squared_l2(d, t, w), expected)
    assert torch.allclose(squared_l2(d, t), ((_flat(d) - _flat(t)) ** 2).sum())


def test_cosine_direct_global():
    d, t = _pair()
    a, b = _flat(d), _flat(t)
    expected = 1 - (a @ b) / (a.norm() * b.norm())
    assert torch.allclose(cosine_distance(d, t), expected)
    assert torch.allclose(CosineDistance()(d, t), expected)
    # identical gradients -> 0, opposite -> 2, scale invariant
    assert cosine_distance(t, t).abs() < 1e-12
    assert torch.allclose(cosine_distance([-x for x in t], t), torch.tensor(2.0, dtype=torch.float64))
    assert torch.allclose(cosine_distance([3 * x for x in d], t), expected)


def test_cosine_weights_multiply_dot_and_norms():
    d, t = _pair(1)
    w = [0.5, 2.0, 3.0]
    dot = sum(wi * (a * b).sum() for wi, a, b in zip(w, d, t))
    na = sum(wi * (a * a).sum() for wi, a in zip(w, d))
    nb = sum(wi * (b * b).sum() for wi, b in zip(w, t))
    expected = 1 - dot / (na.sqrt() * nb.sqrt())
    assert torch.allclose(cosine_distance(d, t, w), expected)


def test_per_layer_cosine_direct():
    d, t = _pair(2)
    cos = [torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0) for a, b in zip(d, t)]
    expected = sum(1 - c for c in cos) / 3
    assert torch.allclose(per_layer_cosine_distance(d, t), expected)
    w = [1.0, 0.0, 3.0]
    expected_w = (1 * (1 - cos[0]) + 3 * (1 - cos[2])) / 4
    assert torch.allclose(CosineDistance(per_layer=True)(d, t, w), expected_w)


def test_cosine_zero_norm_is_finite():
    t = [torch.randn(4, dtype=torch.float64)]
    d = [torch.zeros(4, dtype=torch.float64, requires_grad=True)]
    for fn in (cosine_distance, per_layer_cosine_distance):
        value = fn(d, t)
        assert torch.isfinite(value) and torch.allclose(value, torch.tensor(1.0, dtype=torch.float64))
        (grad,) = torch.autograd.grad(value, d)
        assert torch.isfinite(grad).all()


def test_w1_known_distributions():
    a = [torch.tensor([0.0, 1.0, 2.0, 3.0])]
    b = [torch.tensor([4.0, 2.0, 3.0, 1.0])]  # {1,2,3,4}
    assert torch.allclose(wasserstein(a, b, p=1), torch.tensor(1.0))
    assert torch.allclose(wasserstein(a, b, p=2), torch.tensor(1.0))
    perm = [torch.tensor([3.0, 0.0, 2.0, 1.0])]
    assert wasserstein(a, perm, p=1) == 0
    assert wasserstein(a, perm, p=2) == 0
    # ... while the L2 term of the mixed form sees the permutation
    assert wasserstein_l2(a, perm, l2_weight=1.0) > 0
    # a 2-D tensor is treated as the distribution of its entries
    assert wasserstein([a[0].reshape(2, 2)], [perm[0].reshape(2, 2)]) == 0


def test_wasserstein_direct():
    d, t = _pair(3)
    w = [1.0, 0.5, 2.0]
    diffs = [torch.sort(a.reshape(-1)).values - torch.sort(b.reshape(-1)).values for a, b in zip(d, t)]
    w1 = sum(wi * x.abs().mean() for wi, x in zip(w, diffs))
    w2sq = sum(wi * (x**2).mean() for wi, x in zip(w, diffs))
    w2 = sum(wi * (x**2).mean().sqrt() for wi, x in zip(w, diffs))
    assert torch.allclose(wasserstein(d, t, w, p=1), w1)
    assert torch.allclose(wasserstein(d, t, w, p=2, squared=True), w2sq)
    assert torch.allclose(wasserstein(d, t, w, p=2), w2)
    mixed = WassersteinDistance(p=1, l2_weight=0.3)(d, t, w)
    assert torch.allclose(mixed, w1 + 0.3 * squared_l2(d, t, w))


def test_wasserstein_mask_selects_entries():
    d, t = _pair(4)
    g = torch.Generator().manual_seed(9)
    masks = [(torch.rand(s, generator=g) > 0.4).double() for s in SHAPES]
    expected = 0
    for a, b, m in zip(d, t, masks):
        keep = m.bool()
        if keep.any():
            expected = expected + (torch.sort(a[keep]).values - torch.sort(b[keep]).values).abs().mean()
    assert torch.allclose(wasserstein(d, t, masks=masks), expected)


def test_topk_masks_and_distance_direct():
    t = [torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0, 1.0, -3.0, 0.5])]
    (m,) = topk_magnitude_masks(t, 0.7)  # keep 3 of 10: |-5|, |4|, |-3|
    assert m.tolist() == [0, 1, 0, 0, 0, 0, 1, 0, 1, 0]
    assert topk_magnitude_masks(t, 0.0)[0].sum() == 10
    assert topk_magnitude_masks(t, 0.99)[0].sum() == 1

    d, tt = _pair(5)
    ratio = 0.5
    dot = na = nb = 0
    for a, b in zip(d, tt):
        n = b.numel()
        k = n - math.floor(ratio * n)
        thresh = torch.sort(b.abs().reshape(-1), descending=True).values[k - 1]
        keep = b.abs() >= thresh
        dot = dot + (a[keep] * b[keep]).sum()
        na = na + (a[keep] ** 2).sum()
        nb = nb + (b[keep] ** 2).sum()
    expected = 1 - dot / (na.sqrt() * nb.sqrt())
    assert torch.allclose(topk_cosine_distance(d, tt, prune_ratio=ratio), expected)
    assert torch.allclose(TopKCosineDistance(ratio)(d, tt), expected)
    # prune_ratio 0 is plain cosine
    assert torch.allclose(TopKCosineDistance()(d, tt), cosine_distance(d, tt))


def test_topk_mask_comes_from_target_only():
    t = [torch.tensor([10.0, 0.1, 0.2, 9.0])]
    d1 = [torch.tensor([1.0, 100.0, 100.0, 1.0])]
    d2 = [torch.tensor([1.0, -7.0, 3.0, 1.0])]
    # only entries 0 and 3 count -> the dummy entries 1 and 2 are irrelevant
    assert torch.allclose(topk_cosine_distance(d1, t, prune_ratio=0.5), topk_cosine_distance(d2, t, prune_ratio=0.5))


# ---------------------------------------------------------------------------------------------------
# weights and masks remove influence
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DISTANCES))
def test_zero_weight_removes_tensor(name):
    fn = DISTANCES[name]
    d, t = _pair(6)
    w = [1.0, 0.0, 2.0]
    base = fn(d, t, w)
    d2 = [x.clone() for x in d]
    t2 = [x.clone() for x in t]
    d2[1] = d2[1] * 1e3 + 17.0
    t2[1] = -t2[1] * 50.0
    assert torch.allclose(fn(d2, t2, w), base)
    # even non-finite entries cannot leak through a removed tensor
    d2[1] = torch.full_like(d2[1], float("nan"))
    assert torch.allclose(fn(d2, t2, w), base)
    # and removing a tensor by weight equals dropping it from the lists
    assert torch.allclose(fn([d[0], d[2]], [t[0], t[2]], [1.0, 2.0]), base)


@pytest.mark.parametrize("name", list(DISTANCES))
def test_all_zero_mask_removes_tensor(name):
    fn = DISTANCES[name]
    d, t = _pair(7)
    masks = [None, torch.zeros(SHAPES[1], dtype=torch.float64), torch.ones(SHAPES[2], dtype=torch.float64)]
    base = fn(d, t, None, masks)
    d2 = [x.clone() for x in d]
    t2 = [x.clone() for x in t]
    d2[1] = d2[1] * 1e3 + 17.0
    t2[1] = -t2[1] * 50.0
    assert torch.allclose(fn(d2, t2, None, masks), base)
    assert torch.allclose(fn([d[0], d[2]], [t[0], t[2]]), base)


@pytest.mark.parametrize("name", list(DISTANCES))
def test_mask_shared_by_both_gradients(name):
    """Masked-out entries of the dummy AND of the target are ignored (same mask on both)."""
    fn = DISTANCES[name]
    d, t = _pair(8)
    g = torch.Generator().manual_seed(3)
    masks = [(torch.rand(s, generator=g) > 0.3).double() for s in SHAPES]
    for m in masks:
        m.reshape(-1)[0] = 1.0  # keep at least one entry per tensor
    base = fn(d, t, None, masks)
    d2 = [torch.where(m.bool(), x, x * 40 - 3) for x, m in zip(d, masks)]
    t2 = [torch.where(m.bool(), x, -x * 25 + 5) for x, m in zip(t, masks)]
    if name == "topk":
        # the top-k selection reads the target's magnitudes, so only the dummy may change freely there
        t2 = t
    assert torch.allclose(fn(d2, t2, None, masks), base)


def test_cosine_mask_enters_dot_and_both_norms():
    d, t = _pair(10)
    g = torch.Generator().manual_seed(4)
    masks = [(torch.rand(s, generator=g) > 0.5).double() for s in SHAPES]
    a = _flat([x * m for x, m in zip(d, masks)])
    b = _flat([x * m for x, m in zip(t, masks)])
    expected = 1 - (a @ b) / (a.norm() * b.norm())
    assert torch.allclose(cosine_distance(d, t, masks=masks), expected)
    # bool masks behave like 0/1 float masks, and no rescaling of kept entries
    assert torch.allclose(cosine_distance(d, t, masks=[m.bool() for m in masks]), expected)
    assert torch.allclose(
        squared_l2(d, t, masks=masks), sum((((x - y) * m) ** 2).sum() for x, y, m in zip(d, t, masks))
    )


# ---------------------------------------------------------------------------------------------------
# differentiability
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DISTANCES))
def test_gradcheck_and_gradgradcheck(name):
    fn = DISTANCES[name]
    d, t = _pair(11)
    d = [x.clone().requires_grad_(True) for x in d]
    w = [1.0, 0.5, 2.0]
    g = torch.Generator().manual_seed(5)
    masks = [(torch.rand(s, generator=g) > 0.3).double() for s in SHAPES]
    for m in masks:
        m.reshape(-1)[0] = 1.0

    def f(*xs):
        return fn(list(xs), t, w, masks)

    assert torch.autograd.gradcheck(f, tuple(d), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f, tuple(d), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", list(DISTANCES))
def test_backprop_through_create_graph(name):
    """The attack backpropagates the distance through autograd.grad(create_graph=True) to the inputs."""
    fn = DISTANCES[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 2))
    params = list(model.parameters())
    x_true, y = torch.randn(2, 4), torch.tensor([0, 1])
    target = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x_true), y), params)
    x = torch.randn(2, 4, requires_grad=True)
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    loss = fn(grads, target)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
def test_argument_validation():
    d, t = _pair()
    with pytest.raises(ValueError):
        WassersteinDistance(p=3)
    with pytest.raises(ValueError):
        wasserstein(d, t, p=0)
    with pytest.raises(ValueError):
        WassersteinDistance(l2_weight=-1.0)
    for r in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            TopKCosineDistance(prune_ratio=r)
    with pytest.raises(ValueError):
        CosineDistance(eps=0.0)
    for fn in DISTANCES.values():
        with pytest.raises(ValueError):
            fn(d, t, [1.0, -0.5, 1.0])
        with pytest.raises(ValueError):
            fn(d, t[:2])
        with pytest.raises(ValueError):
            fn(d, t, [1.0, 1.0])
        with pytest.raises(ValueError):
            fn(d, t, None, [None, torch.ones(5), None])
    with pytest.raises(ValueError):
        squared_l2(d, t, [torch.tensor(-1.0), 1.0, 1.0])


def test_tensor_weights_and_float32():
    d, t = _pair(12, dtype=torch.float32)
    w = [torch.tensor(2.0), torch.tensor(0.0), 1.0]
    assert torch.allclose(squared_l2(d, t, w), 2 * ((d[0] - t[0]) ** 2).sum() + ((d[2] - t[2]) ** 2).sum())
    for fn in DISTANCES.values():
        out = fn(d, t, w)
        assert out.dtype == torch.float32 and out.dim() == 0
