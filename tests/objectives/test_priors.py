"""Image priors: total variation, L2 image norm, BatchNorm statistics prior."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gi.objectives import BNStatisticsPrior, L2ImageNorm, TotalVariation

IMG3 = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 9.0]]).reshape(1, 1, 3, 3)


# ---------------------------------------------------------------------------------------------------
# total variation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isotropic", [False, True])
@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_tv_constant_image_is_zero(isotropic, beta):
    x = torch.full((2, 3, 5, 4), 0.7, requires_grad=True)
    tv = TotalVariation(isotropic=isotropic, beta=beta)
    value = tv(x)
    assert value.abs() < 1e-12
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(grad).all()


def test_tv_anisotropic_hand_computed_3x3():
    # horizontal |dx|: 1,1 / 1,1 / 1,2 -> mean 7/6 ; vertical |dy|: 3,3,3 / 3,3,4 -> mean 19/6
    assert torch.allclose(TotalVariation()(IMG3), torch.tensor(26 / 6))
    assert torch.allclose(TotalVariation(reduction="sum")(IMG3), torch.tensor(7.0 + 19.0))
    # squared form: (1+1+1+1+1+4)/6 + (9*5+16)/6
    assert torch.allclose(TotalVariation(beta=2.0)(IMG3), torch.tensor(9 / 6 + 61 / 6))


def test_tv_isotropic_hand_computed_3x3():
    # on the 2x2 grid every (dx, dy) is (1, 3): sqrt(10) each
    expected = torch.tensor(math.sqrt(10.0))
    assert torch.allclose(TotalVariation(isotropic=True, eps=0.0)(IMG3), expected)
    # with the default eps = 1e-8 the value is lowered by at most sqrt(eps) = 1e-4
    assert torch.allclose(TotalVariation(isotropic=True)(IMG3), expected, atol=1.5e-4)
    assert torch.allclose(TotalVariation(isotropic=True, reduction="sum", eps=0.0)(IMG3), 4 * expected)
    assert torch.allclose(TotalVariation(isotropic=True, beta=2.0)(IMG3), torch.tensor(10.0), atol=1e-6)


def test_tv_batch_and_channels_and_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    tv = TotalVariation()
    manual = (x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    assert torch.allclose(tv(x), manual)
    for prior in (TotalVariation(), TotalVariation(isotropic=True), TotalVariation(isotropic=True, beta=2.0)):
        assert torch.autograd.gradcheck(prior, (x.clone().requires_grad_(True),))


def test_tv_validation_and_weight_attribute():
    with pytest.raises(ValueError):
        TotalVariation(beta=0.0)
    with pytest.raises(ValueError):
        TotalVariation(reduction="max")
    with pytest.raises(ValueError):
        TotalVariation()(torch.zeros(3, 3))
    tv = TotalVariation(weight=1e-4)
    assert tv.weight == 1e-4
    tv.weight = 0.5  # a schedule callback may change it; forward stays unweighted
    assert torch.allclose(tv(IMG3), torch.tensor(26 / 6))


# ---------------------------------------------------------------------------------------------------
# L2 image norm
# ---------------------------------------------------------------------------------------------------
def test_l2_image_norm():
    x = torch.arange(8.0).reshape(2, 1, 2, 2)
    per_image_sq = torch.tensor([0 + 1 + 4 + 9, 16 + 25 + 36 + 49], dtype=torch.float32)
    assert torch.allclose(L2ImageNorm()(x), (per_image_sq / 4).mean())
    assert torch.allclose(L2ImageNorm(reduction="sum")(x), per_image_sq.mean())
    assert L2ImageNorm().weight == 1e-6
    assert L2ImageNorm()(torch.zeros(1, 3, 4, 4)) == 0


# ---------------------------------------------------------------------------------------------------
# BN statistics prior
# ---------------------------------------------------------------------------------------------------
def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


def _hand_stats(h: torch.Tensor):
    mean = h.mean(dim=(0, 2, 3))
    var = ((h - mean.reshape(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    return mean, var


def _calibrated(model: nn.Sequential, x: torch.Tensor) -> nn.Sequential:
    """Set each BN layer's running statistics to the statistics of its input on the batch ``x``."""
    model.eval()
    with torch.no_grad():
        h1 = model[0](x)
        model[1].running_mean.copy_(_hand_stats(h1)[0])
        model[1].running_var.copy_(_hand_stats(h1)[1])
        h2 = model[3](model[2](model[1](h1)))  # BN1 in eval mode uses the stats just set
        model[4].running_mean.copy_(_hand_stats(h2)[0])
        model[4].running_var.copy_(_hand_stats(h2)[1])
    return model


def test_bn_prior_zero_on_matching_batch_and_positive_otherwise():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 6, 6)
    model = _calibrated(_bn_model(), x)
    prior = BNStatisticsPrior().attach(model)
    model(x)
    assert prior(x).abs() < 1e-6
    other = torch.rand(4, 3, 6, 6, requires_grad=True)
    model(other)
    value = prior(other)
    assert value > 1e-3
    value.backward()  # the statistics stay in the graph: the prior reaches the dummy images
    assert other.grad is not None and other.grad.abs().sum() > 0
    # eval mode: BN used its running stats, which the hooks did not touch
    assert not model.training


def test_bn_prior_matches_hand_computation_and_first_multiplier():
    torch.manual_seed(2)
    x_ref = torch.rand(4, 3, 6, 6)
    model = _calibrated(_bn_model(), x_ref)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        h1 = model[0](x)
        h2 = model[3](model[2](model[1](h1)))
    terms = []
    for h, bn in ((h1, model[1]), (h2, model[4])):
        mu, var = _hand_stats(h)
        terms.append((mu - bn.running_mean).norm() + (var - bn.running_var).norm())

    p1 = BNStatisticsPrior(first_bn_multiplier=1.0).attach(model)
    p10 = BNStatisticsPrior(first_bn_multiplier=10.0).attach(model)
    model(x)
    assert torch.allclose(p1(x), terms[0] + terms[1], atol=1e-5)
    assert torch.allclose(p10(x), 10 * terms[0] + terms[1], atol=1e-5)
    assert torch.allclose(p10(x) - p1(x), 9 * terms[0], atol=1e-5)
    stats = p1.layer_statistics()
    assert len(stats) == 2 and stats[1][0].shape == (5,)
    assert p1.layer_counts() == [3 * 6 * 6, 3 * 6 * 6]
    assert BNStatisticsPrior().weight == 0.1 and BNStatisticsPrior().first_bn_multiplier == 10.0


def test_bn_prior_detach_and_errors():
    model = _bn_model().eval()
    prior = BNStatisticsPrior()
    with pytest.raises(RuntimeError, match="attach"):
        prior(torch.zeros(1, 3, 4, 4))
    prior.attach(model)
    with pytest.raises(RuntimeError, match="after the victim"):
        prior(torch.zeros(1, 3, 4, 4))
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert n_hooks == 2
    prior.attach(model)  # re-attaching does not stack hooks
    assert sum(len(m._forward_hooks) for m in model.modules()) == 2
    prior.detach()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    model(torch.zeros(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match="attach"):
        prior(torch.zeros(1, 3, 4, 4))
    # the victim's parameters never become the prior's
    prior.attach(model)
    assert list(prior.parameters()) == [] and prior.state_dict() == {}
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BNStatisticsPrior().attach(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    with pytest.raises(ValueError, match="running statistics"):
        BNStatisticsPrior().attach(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
