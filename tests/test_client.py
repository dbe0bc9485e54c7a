"""lightning_gi/client.py: the ONE simulation of what a client computes and shares, used by the victim side and
by every attack. Checked against independent computations (plain autograd, torch.optim.SGD)."""
import copy

import pytest
import torch
from torch import nn

from lightning_gi.client import (
    FedAvgClient,
    ThreatModel,
    apply_defenses,
    capture_observation,
    client_gradient,
    client_seed,
    simulate_clients,
)
from lightning_gi.victim.defenses import GaussianNoise


def _sgd_update(model, images, labels, steps, lr):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(m(images), labels).backward()
        opt.step()
    return [a.detach() - b.detach() for a, b in zip(m.parameters(), model.parameters())]


def test_threat_model_round_trips_through_metadata():
    tm = ThreatModel("fedavg", local_steps=3, local_lr=0.05, local_batch_size=1, client_batch_sizes=[2, 2], aggregation="sum")
    assert ThreatModel.from_metadata(tm.to_metadata(), 4) == tm
    assert ThreatModel.from_metadata({}, 4).is_single_gradient
    assert tm.pseudo_gradient_scale == pytest.approx(-1 / (0.05 * 3)) and tm.sizes(4) == [2, 2]
    with pytest.raises(ValueError, match="sum to 3 but the observation's batch_size is 4"):
        ThreatModel.from_metadata({"client_batch_sizes": "1,2"}, 4)


def test_clients_fedavg_mean_equals_sgd_per_client(lenet16, photos16):
    images, labels = photos16
    update = simulate_clients(lenet16, images, labels, FedAvgClient(3, 0.1), num_clients=2, aggregation="mean")
    per_client = [_sgd_update(lenet16, images[k:k + 1], labels[k:k + 1], 3, 0.1) for k in range(2)]
    for got, a, b in zip(update.tensors, *per_client):
        torch.testing.assert_close(got, (a + b) / 2, atol=1e-6, rtol=1e-5)
    # the attacker's simulation of the same threat model gives the same update
    tm = ThreatModel("fedavg", local_steps=3, local_lr=0.1, client_batch_sizes=[1, 1])
    for a, b in zip(tm.simulate(lenet16, images, labels), update.tensors):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_attacker_fast_path_equals_the_victim_side_gradient_and_is_differentiable(lenet16, photos16):
    images, labels = photos16
    reference = torch.autograd.grad(nn.functional.cross_entropy(lenet16(images), labels), list(lenet16.parameters()))
    victim_side, _ = client_gradient(lenet16, images, labels)
    x = images.clone().requires_grad_(True)
    attacker, _ = client_gradient(lenet16, x, labels, params=list(lenet16.parameters()), create_graph=True)
    for r, v, a in zip(reference, victim_side, attacker):
        torch.testing.assert_close(v, r)
        torch.testing.assert_close(a.detach(), r)
    (dx,) = torch.autograd.grad(sum((a ** 2).sum() for a in attacker), [x])
    assert dx.abs().sum() > 0


def test_one_seeding_rule_for_defenses_across_clients(lenet16, photos16):
    images, labels = photos16
    defense = GaussianNoise(1e-2, seed=7)
    two = simulate_clients(lenet16, images, labels, num_clients=2, defenses=[defense], aggregation="sum")
    clean = [client_gradient(lenet16, images[k:k + 1], labels[k:k + 1])[0] for k in range(2)]
    expected = [apply_defenses([defense], clean[k], client_index=k) for k in range(2)]
    for got, a, b in zip(two.tensors, *expected):
        torch.testing.assert_close(got, a + b)
    assert client_seed(7, 0) == 7 and client_seed(7, 1) != client_seed(7, 0) and client_seed(None, 3) is None
    # a lone client (capture_observation) draws exactly client 0's noise
    lone = capture_observation(lenet16, images[:1], labels[:1], defenses=[defense])
    for a, b in zip(lone.gradients, expected[0]):
        torch.testing.assert_close(a, b)


def test_shared_buffers_are_the_clients_mean_after_train_mode_steps(photos16):
    images, labels = photos16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).train()
    update = simulate_clients(model, images, labels, FedAvgClient(2, 0.1), num_clients=2)
    means = []
    for k in range(2):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(m(images[k:k + 1]), labels[k:k + 1]).backward()
            opt.step()
        means.append(m[1].running_mean.detach())
    torch.testing.assert_close(update.buffers["1.running_mean"], (means[0] + means[1]) / 2, atol=1e-6, rtol=1e-5)
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # the model itself is never modified


def test_fedavg_pseudo_gradient_is_the_fedsgd_gradient_to_first_order(lenet16, photos16):
    """w_E - w_0 divided by -lr * E is the client batch's FedSGD gradient for small steps (so label-count rules,
    which read N * dL/db, see the right scale; dividing by -lr alone overstates it E times)."""
    images, labels = photos16
    model, images = lenet16.double(), images.double()  # float64: w_E - w_0 of tiny steps keeps its digits
    gradient, _ = client_gradient(model, images, labels)
    tm = ThreatModel("fedavg", local_steps=4, local_lr=1e-5, local_batch_size=1)
    pseudo = [u * tm.pseudo_gradient_scale for u in tm.simulate(model, images, labels)]
    for p, g in zip(pseudo, gradient):
        torch.testing.assert_close(p, g, atol=1e-3 * float(g.abs().max()), rtol=1e-3)
