"""``model_seed`` gives the architecture's own initialisation (issue 11, item 2).

A seeded victim must be the network a user gets from ``torch.manual_seed(s); Model(**kwargs)``: for a
torchvision ResNet that is kaiming_normal(fan_out) convolutions and BN weight 1 / bias 0, not PyTorch's
per-layer ``reset_parameters`` defaults (which shrink conv1's gradient by an order of magnitude).
"""
import math

import pytest
import torch
import torchvision
from torch import nn

from lightning_gi.victim import FedSGDVictim, LeNet, torchvision_classifier
from lightning_gi.victim.models import reinitialise, remember_builder


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _seeded_resnet_victim(seed: int, num_classes: int = 14) -> nn.Module:
    dm = FedSGDVictim(
        torchvision_classifier("resnet18", num_classes=num_classes), model_seed=seed, image_shape=(3, 32, 32),
        normalization="none",
    )
    return dm.model


def _conv1_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, [model.conv1.weight])
    return float(g.norm())


@pytest.mark.parametrize("seed", [0, 5])
def test_seeded_resnet18_is_torchvision_own_init(seed):
    model = _seeded_resnet_victim(seed)
    torch.manual_seed(seed)
    reference = torchvision.models.resnet18(num_classes=14)
    assert _same(model, reference)


def test_seeded_resnet18_init_statistics():
    model = _seeded_resnet_victim(0)
    w = model.conv1.weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert abs(float(w.detach().std()) / math.sqrt(2.0 / fan_out) - 1.0) < 0.05  # kaiming_normal, fan_out, ReLU gain
    deep = model.layer3[0].conv2.weight
    deep_fan_out = deep.shape[0] * deep.shape[2] * deep.shape[3]
    assert abs(float(deep.detach().std()) / math.sqrt(2.0 / deep_fan_out) - 1.0) < 0.05
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_seeded_resnet18_gradient_scale_matches_an_independent_model():
    """conv1's gradient norm on the seeded victim is of the size an independently built ResNet-18 gives."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    y = torch.tensor([0, 3, 7, 11])
    seeded = [_conv1_grad_norm(_seeded_resnet_victim(s), x, y) for s in (0, 1)]
    independent = []
    for s in (100, 101):
        torch.manual_seed(s)
        independent.append(_conv1_grad_norm(torchvision.models.resnet18(num_classes=14), x, y))
    ratio = (sum(seeded) / 2) / (sum(independent) / 2)
    assert 1 / 3 < ratio < 3, f"seeded/independent conv1 gradient norm ratio {ratio:.3f}"


def test_seeds_differ_repeat_and_leave_the_global_rng_alone():
    models = [torchvision_classifier("resnet18", num_classes=14) for _ in range(3)]  # unseeded constructions
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a, b, a2 = (FedSGDVictim(m, model_seed=s, normalization="none").model for m, s in zip(models, (0, 1, 0)))
    assert torch.equal(torch.get_rng_state(), state)  # seeding neither reads nor moves the global stream
    assert _same(a, a2)
    assert not torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.fc.weight, b.fc.weight)


def test_reinitialise_in_place_keeps_parameter_objects():
    model = torchvision_classifier("resnet18", num_classes=10)
    before = [id(p) for p in model.parameters()]
    assert reinitialise(model, 2) is model
    assert [id(p) for p in model.parameters()] == before
    torch.manual_seed(2)
    assert _same(model, torchvision.models.resnet18(num_classes=10))


def test_seeded_lenet_is_its_constructor():
    model = LeNet(num_classes=10, image_size=16, width=8)
    reinitialise(model, 7)
    torch.manual_seed(7)
    assert _same(model, LeNet(num_classes=10, image_size=16, width=8))
    assert float(model.fc.weight.detach().abs().max()) <= 0.5  # DLG's uniform(-0.5, 0.5)


class _UserNet(nn.Module):
    """A user class path: constructor arguments stored under their own names, its own init."""

    def __init__(self, hidden: int = 6, num_classes: int = 3, scale: float = 1.0) -> None:
        super().__init__()
        self.hidden, self.num_classes, self.scale = hidden, num_classes, scale
        self.body = nn.Linear(12, hidden)
        self.head = nn.Linear(hidden, num_classes)
        for p in self.parameters():
            nn.init.normal_(p, 0.0, scale)

    def forward(self, x):
        return self.head(torch.relu(self.body(x.flatten(1))))


class _Opaque(nn.Module):
    def __init__(self, width: int) -> None:  # width is not stored
        super().__init__()
        self.lin = nn.Linear(4, width)


def test_user_class_rebuilt_through_its_constructor():
    model = _UserNet(hidden=9, num_classes=4, scale=0.3)
    reinitialise(model, 11)
    torch.manual_seed(11)
    assert _same(model, _UserNet(hidden=9, num_classes=4, scale=0.3))
    opaque = _Opaque(5)
    with pytest.raises(ValueError, match="remember_builder"):
        reinitialise(opaque, 0)
    remember_builder(opaque, _Opaque, width=5)
    reinitialise(opaque, 0)
    torch.manual_seed(0)
    assert _same(opaque, _Opaque(5))


def test_resized_head_and_stem_use_the_architecture_init(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    file_sd = torch.load(path, weights_only=True)
    torch.manual_seed(3)
    model = torchvision_classifier("resnet18", num_classes=5, weights_path=str(path))
    torch.manual_seed(3)
    fresh = torchvision.models.resnet18(num_classes=5)
    assert torch.equal(model.fc.weight, fresh.fc.weight) and torch.equal(model.fc.bias, fresh.fc.bias)
    assert all(torch.equal(v, file_sd[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))
    grey = FedSGDVictim(torchvision_classifier("resnet18", num_classes=10, in_channels=1), model_seed=4,
                        image_shape=(1, 32, 32), normalization="none").model
    again = FedSGDVictim(torchvision_classifier("resnet18", num_classes=10, in_channels=1), model_seed=4,
                         image_shape=(1, 32, 32), normalization="none").model
    assert _same(grey, again) and grey.conv1.weight.shape == (64, 1, 7, 7)
    assert abs(float(grey.conv1.weight.detach().std()) / math.sqrt(2.0 / (64 * 49)) - 1.0) < 0.1


def test_seeded_bn_calibrated_victim_keeps_its_calibration():
    """model_seed on a calibrated stand-in rebuilds the calibrated model with that seed (BN statistics kept)."""
    from lightning_gi.victim.calibration import bn_calibrated_classifier

    model = bn_calibrated_classifier("resnet18", 10, image_size=16, seed=0, crops_per_photo=1)
    reinitialise(model, 3)
    expected = bn_calibrated_classifier("resnet18", 10, image_size=16, seed=3, crops_per_photo=1)
    assert _same(model, expected)
    assert float(model.bn1.running_var.sub(1).abs().max()) > 1e-3  # calibrated, not the fresh 0/1 statistics


def test_seeded_torchvision_instance_from_a_class_path():
    """``class_path: torchvision.models.resnet18`` (built outside lightning_gi) is re-seeded with its own init."""
    model = torchvision.models.resnet18(num_classes=7)
    reinitialise(model, 9)
    torch.manual_seed(9)
    assert _same(model, torchvision.models.resnet18(num_classes=7))


def test_convnet_seeded_equals_its_constructor_and_heads_differ():
    from lightning_gi.victim import ConvNet

    for kwargs in ({}, {"head": "pool"}, {"norm": "batch", "width": 8}):
        model = reinitialise(ConvNet(num_classes=5, **kwargs), 3)
        torch.manual_seed(3)
        fresh = ConvNet(num_classes=5, **kwargs)
        for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
            assert torch.equal(a, b), name
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    flat, pooled = ConvNet(width=8), ConvNet(width=8, head="pool")
    assert flat.fc.in_features == 32 * 8 * 8 and pooled.fc.in_features == 32
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in ConvNet(norm="batch").modules())
    with pytest.raises(ValueError, match="divisible"):
        ConvNet(image_size=30)
