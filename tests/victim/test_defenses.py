"""Client-side defenses: each one's statistics hold on real gradients of the sigmoid LeNet on bundled
photographs; DP-SGD's per-example clipping and noise; bad parameters fail with clear errors."""
import math

import pytest
import torch

from lightning_gi.observation import capture_observation, client_gradients
from lightning_gi.victim import LeNet
from lightning_gi.victim.data import build_dataset, select_batch
from lightning_gi.victim.defenses import (
    GaussianNoise,
    GradientClipping,
    LaplaceNoise,
    LowPrecision,
    TopKPruning,
    global_norm,
)
from lightning_gi.victim.dpsgd import (
    DPSGDClient,
    clip_per_example,
    dp_sgd_gradient,
    per_example_gradients,
    rdp_epsilon,
)
from lightning_gi.victim.models import reinitialise


@pytest.fixture(scope="module")
def batch():
    ds = build_dataset("photographs", image_size=32, channels=3)
    images, labels, _ = select_batch(ds, 4, seed=0)
    return images, labels


@pytest.fixture(scope="module")
def model():
    return reinitialise(LeNet(num_classes=10, image_size=32), 0)


@pytest.fixture(scope="module")
def grads(model, batch):
    g = client_gradients(model, *batch)
    assert all(bool((t != 0).all()) for t in g), "sigmoid LeNet gradients have no exact zeros"
    return g


def _flat(ts):
    return torch.cat([t.reshape(-1).double() for t in ts])


# ---------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("std", [1e-3, 1e-1])
def test_gaussian_noise_std_and_mean(grads, std):
    out = GaussianNoise(std=std, seed=0)(grads)
    noise = _flat(out) - _flat(grads)
    n = noise.numel()
    assert n > 15000
    assert noise.std().item() == pytest.approx(std, rel=0.03)
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(n)
    assert [o.shape for o in out] == [g.shape for g in grads] and all(o.dtype == g.dtype for o, g in zip(out, grads))


def test_gaussian_noise_relative_scale_per_layer(grads):
    out = GaussianNoise(std=0.1, relative=True, seed=1)(grads)
    for o, g in zip(out, grads):
        if g.numel() < 3000:
            continue
        expected = 0.1 * g.abs().max().item()
        assert (o - g).double().std().item() == pytest.approx(expected, rel=0.06)


def test_laplace_noise_scale_and_std(grads):
    b = 1e-2
    noise = _flat(LaplaceNoise(scale=b, seed=0)(grads)) - _flat(grads)
    assert noise.abs().mean().item() == pytest.approx(b, rel=0.03)  # E|X| = b
    assert noise.std().item() == pytest.approx(math.sqrt(2) * b, rel=0.05)  # std = sqrt(2) b
    # heavier tails than a Gaussian of the same std: excess kurtosis 3
    z = noise / noise.std()
    assert (z.pow(4).mean().item() - 3.0) == pytest.approx(3.0, abs=0.8)


def test_laplace_relative_is_the_stepwise_setting(grads):
    out = LaplaceNoise(scale=0.1, relative=True, seed=2)(grads)
    for o, g in zip(out, grads):
        if g.numel() >= 3000:
            assert (o - g).abs().double().mean().item() == pytest.approx(0.1 * g.abs().max().item(), rel=0.06)


def test_noise_is_reproducible_by_seed_and_zero_is_identity(grads):
    a, b, c = GaussianNoise(1e-2, seed=3)(grads), GaussianNoise(1e-2, seed=3)(grads), GaussianNoise(1e-2, seed=4)(grads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for d in (GaussianNoise(0.0), LaplaceNoise(0.0)):
        assert all(torch.equal(x, y) for x, y in zip(d(grads), grads))


def test_independent_noise_per_generator(grads):
    d = GaussianNoise(1e-2, seed=0)
    x = d.apply(grads, torch.Generator().manual_seed(1))
    y = d.apply(grads, torch.Generator().manual_seed(2))
    assert not torch.equal(x[0], y[0])


def test_one_seeding_rule_client_zero_draws_the_lone_clients_noise_and_clients_differ(grads):
    """lightning_gi.client.apply_defenses: client 0 draws exactly what the defense alone draws from its seed;
    other clients draw independent noise; two seeded defenses in one pipeline draw from their own seeds."""
    from lightning_gi.client import apply_defenses

    d = GaussianNoise(1e-2, seed=5)
    alone = d(grads)
    assert all(torch.equal(a, b) for a, b in zip(apply_defenses([d], grads, client_index=0), alone))
    assert not torch.equal(apply_defenses([d], grads, client_index=1)[0], alone[0])
    two = apply_defenses([GaussianNoise(1e-2, seed=5), LaplaceNoise(1e-2, seed=9)], grads, client_index=0)
    expected = LaplaceNoise(1e-2, seed=9)(GaussianNoise(1e-2, seed=5)(grads))
    assert all(torch.equal(a, b) for a, b in zip(two, expected))


# ---------------------------------------------------------------------------------------- clipping
def test_global_norm_clipping(grads):
    norm = global_norm(grads)
    assert norm > 1.0
    out = GradientClipping(max_norm=1.0)(grads)
    assert global_norm(out) == pytest.approx(1.0, rel=1e-5)
    ratios = [(o / g).double() for o, g in zip(out, grads)]  # one common factor: the direction is kept
    assert all(torch.allclose(r, torch.full_like(r, 1.0 / norm), rtol=1e-4) for r in ratios)
    loose = GradientClipping(max_norm=10 * norm)(grads)
    assert all(torch.equal(o, g) for o, g in zip(loose, grads))
    inf_clip = GradientClipping(max_norm=0.01, norm_type=math.inf)(grads)
    assert max(t.abs().max().item() for t in inf_clip) == pytest.approx(0.01, rel=1e-5)


# ---------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 0.9, 0.99, 1.0])
def test_topk_pruning_fraction_and_kept_are_largest(grads, ratio):
    out = TopKPruning(prune_ratio=ratio)(grads)
    for o, g in zip(out, grads):
        n = g.numel()
        zeros = int((o == 0).sum())
        assert zeros == round(ratio * n)
        kept = o != 0
        assert torch.equal(o[kept], g[kept])  # kept entries are unchanged
        if 0 < zeros < n:
            assert g[kept].abs().min() >= g[~kept].abs().max()


def test_topk_pruning_min_keep(grads):
    out = TopKPruning(prune_ratio=1.0, min_keep=1)(grads)
    assert all(int((o != 0).sum()) == 1 for o in out)


def test_pruning_through_the_observation(model, batch):
    obs = capture_observation(model, *batch, defenses=[TopKPruning(0.9)])
    total = sum(g.numel() for g in obs.gradients)
    zeros = sum(int((g == 0).sum()) for g in obs.gradients)
    assert zeros / total == pytest.approx(0.9, abs=0.01)


# ---------------------------------------------------------------------------------------- precision
def test_int8_quantisation_error_bound_and_levels(grads):
    out = LowPrecision("int8")(grads)
    for o, g in zip(out, grads):
        s = g.abs().max().item() / 127
        err = (o.double() - g.double()).abs().max().item()
        assert err <= s / 2 * (1 + 1e-5) + 1e-12
        assert torch.unique(torch.round(o.double() / s)).numel() <= 255
        assert o.dtype == g.dtype
    assert max((o - g).abs().max().item() for o, g in zip(out, grads)) > 0


@pytest.mark.parametrize("precision,rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_float_rounding_error_bound(grads, precision, rel):
    out = LowPrecision(precision)(grads)
    for o, g in zip(out, grads):
        err = (o.double() - g.double()).abs()
        assert bool((err <= rel * g.double().abs() + 2.0**-24).all())
        assert o.dtype == torch.float32
    assert any(not torch.equal(o, g) for o, g in zip(out, grads))


def test_fp16_saturates_instead_of_inf():
    out = LowPrecision("fp16")([torch.tensor([1e6, -1e6, 1.0])])[0]
    assert torch.isfinite(out).all() and out[0].item() == 65504.0 and out[1].item() == -65504.0


# ---------------------------------------------------------------------------------------- DP-SGD
def test_per_example_gradients_average_to_the_batch_gradient(model, batch, grads):
    per = per_example_gradients(model, *batch)
    assert [p.shape[0] for p in per] == [4] * len(grads)
    for p, g in zip(per, grads):
        torch.testing.assert_close(p.mean(0), g, atol=2e-6, rtol=1e-5)


def test_dp_sgd_clipping_and_noise_statistics(model, batch):
    per = per_example_gradients(model, *batch)
    clipped, norms = clip_per_example(per, clip_norm=0.5)
    assert bool((norms > 0.5).all())
    new_norms = torch.stack([t.reshape(4, -1).double().pow(2).sum(1) for t in clipped]).sum(0).sqrt()
    torch.testing.assert_close(new_norms, torch.full_like(new_norms, 0.5), rtol=1e-5, atol=0)
    noiseless = dp_sgd_gradient(model, *batch, clip_norm=0.5, noise_multiplier=0.0)
    for a, c in zip(noiseless, clipped):
        torch.testing.assert_close(a, c.mean(0))
    sigma, clip, b = 2.0, 0.5, 4
    noisy = dp_sgd_gradient(model, *batch, clip_norm=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(0))
    z = (_flat(noisy) - _flat(noiseless)) * b / (sigma * clip)
    assert z.std().item() == pytest.approx(1.0, rel=0.03)


def test_dp_sgd_client_epsilon_and_metadata(model, batch):
    pytest.importorskip("opacus")
    eps1 = DPSGDClient(clip_norm=1.0, noise_multiplier=1.0).epsilon()
    eps2 = DPSGDClient(clip_norm=1.0, noise_multiplier=2.0).epsilon()
    assert eps1 == pytest.approx(4.7285, rel=1e-3)  # opacus RDP, sigma 1, q 1, 1 step, delta 1e-5
    assert eps2 < eps1
    assert rdp_epsilon(1.0, 0.01, 1000, 1e-5) == pytest.approx(2.10, rel=0.01)
    meta = DPSGDClient(noise_multiplier=1.0).metadata()
    assert meta["threat_model"] == "dpsgd" and meta["dp_epsilon"] == pytest.approx(eps1)
    shared = DPSGDClient(clip_norm=1.0, noise_multiplier=0.5, seed=0)(model, *batch)
    assert [s.shape for s in shared] == [p.shape for p in model.parameters()]


def test_dp_sgd_refuses_train_mode_batchnorm(batch):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10)
    ).train()
    with pytest.raises(ValueError, match="BatchNorm in eval mode"):
        per_example_gradients(net, *batch)
    per = per_example_gradients(net.eval(), *batch)
    assert per[0].shape == (4, 4, 3, 3, 3)


# ---------------------------------------------------------------------------------------- bad parameters
@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: GaussianNoise(std=-0.1), "std must be >= 0"),
        (lambda: GaussianNoise(std=float("nan")), "std must be"),
        (lambda: GaussianNoise(std="big"), "std must be a number"),
        (lambda: GaussianNoise(std=0.1, relative="yes"), "relative must be a bool"),
        (lambda: LaplaceNoise(scale=-1e-3), "scale must be >= 0"),
        (lambda: TopKPruning(prune_ratio=1.5), r"prune_ratio must be in \[0.0, 1.0\]"),
        (lambda: TopKPruning(prune_ratio=-0.1), r"prune_ratio must be in \[0.0, 1.0\]"),
        (lambda: TopKPruning(prune_ratio=0.5, min_keep=-1), "min_keep"),
        (lambda: GradientClipping(max_norm=0.0), r"max_norm must be in \(0.0"),
        (lambda: GradientClipping(max_norm=-1.0), "max_norm"),
        (lambda: GradientClipping(max_norm=1.0, norm_type=0.5), "norm_type"),
        (lambda: LowPrecision("int4"), "precision must be one of"),
        (lambda: DPSGDClient(clip_norm=0.0), "clip_norm must be > 0"),
        (lambda: DPSGDClient(noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
        (lambda: DPSGDClient(sample_rate=0.0), "sample_rate"),
        (lambda: DPSGDClient(delta=1.0), "delta"),
    ],
)
def test_bad_parameters_fail_clearly(build, match):
    with pytest.raises(ValueError, match=match):
        build()
