"""Threat models: FedAvg local updates (unrolled with torch.func), aggregated clients, what is shared,
and attacks that match updates (FedAvgIDLG) on a tiny LeNet with bundled photographs."""
import contextlib
import copy
import io
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

from lightning_gi.attacks.fedavg import FedAvgDLG, FedAvgIDLG
from lightning_gi.labels import SharedLabels
from lightning_gi.metrics import reconstruction_metrics
from lightning_gi.observation import GradientObservation, client_gradients
from lightning_gi.victim import LeNet
from lightning_gi.victim.data import build_dataset, select_batch
from lightning_gi.victim.datamodule import AttackInputs
from lightning_gi.victim.defenses import GaussianNoise
from lightning_gi.victim.dpsgd import DPSGDClient
from lightning_gi.victim.models import reinitialise
from lightning_gi.victim.threat_models import (
    FedAvgClient,
    FedSGDClient,
    ThreatModelVictim,
    UpdateSpec,
    simulate_shared_update,
    unrolled_update,
)
from lightning_gi.client import ThreatModel
from factories import lean_trainer, lenet, photos

ROOT = Path(__file__).resolve().parents[2]


def _manual_sgd(model, images, labels, steps, lr, per_step=None):
    """An independent reference: torch.optim.SGD on a deep copy, returns w_E - w_0."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    n = images.shape[0]
    for s in range(steps):
        idx = torch.arange(n) if per_step is None else (torch.arange(per_step) + s * per_step) % n
        opt.zero_grad()
        nn.functional.cross_entropy(m(images[idx]), labels[idx]).backward()
        opt.step()
    return [(a - b).detach() for a, b in zip(m.parameters(), model.parameters())]


# ------------------------------------------------------------------------------- the unrolled update
def test_one_local_step_is_minus_lr_times_the_fedsgd_gradient():
    model = lenet(size=32)
    images, labels = photos(4, size=32)
    grads = client_gradients(model, images, labels)
    update, _ = unrolled_update(model, images, labels, local_steps=1, local_lr=0.1)
    for u, g in zip(update, grads):
        torch.testing.assert_close(u, -0.1 * g, atol=1e-6, rtol=0)
    # float64: equal to round-off
    m64, x64 = copy.deepcopy(model).double(), images.double()
    g64 = client_gradients(m64, x64, labels)
    u64, _ = unrolled_update(m64, x64, labels, 1, 0.1)
    assert max((u + 0.1 * g).abs().max().item() for u, g in zip(u64, g64)) < 1e-15


@pytest.mark.parametrize("steps,per_step", [(3, None), (5, 1), (4, 3)])
def test_unrolled_update_equals_torch_sgd(steps, per_step):
    model = lenet(size=32)
    images, labels = photos(4, size=32)
    before = [p.detach().clone() for p in model.parameters()]
    update, _ = unrolled_update(model, images, labels, steps, 0.05, per_step)
    reference = _manual_sgd(model, images, labels, steps, 0.05, per_step)
    for u, r in zip(update, reference):
        torch.testing.assert_close(u, r, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the model is untouched


def test_attacker_simulation_is_differentiable_and_equals_the_client():
    model = lenet(size=32)
    for p in model.parameters():
        p.requires_grad_(True)
    images, labels = photos(2, size=32)
    spec = UpdateSpec("fedavg", local_steps=3, local_lr=0.1, local_batch_size=1)
    client, _ = FedAvgClient(3, 0.1, 1).compute(model, images, labels)
    x = images.clone().requires_grad_(True)
    sim = simulate_shared_update(model, x, labels, spec, params=list(model.parameters()), create_graph=True)
    for s, c in zip(sim, client):
        torch.testing.assert_close(s.detach(), c, atol=1e-7, rtol=1e-5)
    (gx,) = torch.autograd.grad(sum((s ** 2).sum() for s in sim), x)
    assert gx.abs().sum() > 0


def test_train_mode_batchnorm_buffers_are_simulated_not_mutated():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    net.train()
    images, labels = photos(4, size=16)
    running = net[1].running_mean.clone()
    update, buffers = FedAvgClient(2, 0.1).compute(net, images, labels)
    assert torch.equal(net[1].running_mean, running)  # the victim model is not modified
    assert not torch.allclose(buffers["1.running_mean"], running)  # the client's copy moved
    assert int(buffers["1.num_batches_tracked"]) == 2
    dm = ThreatModelVictim.from_tensors(net, images, labels, client=FedAvgClient(2, 0.1), share_buffers=True, train_mode=True)
    obs = dm.observation
    assert obs.metadata["train_mode"] is True and obs.metadata["buffers_shared"] is True
    torch.testing.assert_close(dm.shared_buffers["1.running_mean"], buffers["1.running_mean"])


# ------------------------------------------------------------------------------- the DataModule
def test_aggregated_fedsgd_clients_mean_and_sum():
    model = lenet(size=32)
    images, labels = photos(4, size=32)
    full = client_gradients(model, images, labels)
    mean_obs = ThreatModelVictim.from_tensors(model, images, labels, num_clients=2, aggregation="mean").observation
    sum_obs = ThreatModelVictim.from_tensors(model, images, labels, num_clients=2, aggregation="sum").observation
    for m, s, f in zip(mean_obs.gradients, sum_obs.gradients, full):
        torch.testing.assert_close(m, f, atol=1e-6, rtol=1e-5)  # equal client sizes: mean of means = full mean
        torch.testing.assert_close(s, 2 * f, atol=2e-6, rtol=1e-5)
    assert mean_obs.batch_size == 4
    assert mean_obs.metadata["client_batch_sizes"] == "2,2" and mean_obs.metadata["aggregation"] == "mean"


def test_fedavg_metadata_round_trips_through_the_file(tmp_path):
    model = lenet(size=32)
    images, labels = photos(4, size=32)
    dm = ThreatModelVictim.from_tensors(
        model, images, labels, client=FedAvgClient(local_steps=3, local_lr=0.05, local_batch_size=2),
        num_clients=2, aggregation="sum", share_labels=True, save_observation=str(tmp_path / "obs.pt"),
    )
    obs = dm.observation
    loaded = GradientObservation.load(tmp_path / "obs.pt")
    assert loaded.metadata == obs.metadata
    assert torch.equal(loaded.labels, labels)
    spec = UpdateSpec.from_metadata(loaded.metadata, loaded.batch_size)
    assert spec == UpdateSpec("fedavg", 3, 0.05, 2, [2, 2], "sum")
    expected = simulate_shared_update(model, images, labels, spec)
    for e, g in zip(expected, loaded.gradients):
        torch.testing.assert_close(e, g, atol=1e-7, rtol=1e-5)


def test_what_is_shared_options():
    model = lenet(size=32)
    images, labels = photos(4, size=32)
    hidden = ThreatModelVictim.from_tensors(model, images, labels, share_num_data_points=False, assumed_batch_size=2)
    obs = hidden.observation
    assert obs.batch_size == 2 and "client_batch_sizes" not in obs.metadata and obs.labels is None
    assert obs.metadata["num_data_points_shared"] is False
    assert hidden.ground_truth().images.shape[0] == 4
    shared = ThreatModelVictim.from_tensors(model, images, labels, share_labels=True).observation
    assert torch.equal(shared.labels, labels) and shared.metadata["model_state"] == "as given"


def test_defenses_draw_independent_noise_per_client():
    model = lenet(size=32)
    images, labels = photos(2, size=32)
    clean = ThreatModelVictim.from_tensors(model, images, labels, num_clients=2, aggregation="sum").observation
    noisy = ThreatModelVictim.from_tensors(
        model, images, labels, num_clients=2, aggregation="sum", defenses=[GaussianNoise(std=0.1, seed=0)]
    ).observation
    noise = torch.cat([(a - b).reshape(-1) for a, b in zip(noisy.gradients, clean.gradients)])
    # two independent N(0, 0.01) draws summed: std 0.1 * sqrt(2) (identical draws would give 0.2)
    assert noise.std().item() == pytest.approx(0.1 * 2 ** 0.5, rel=0.05)


def test_dpsgd_client_in_the_datamodule_records_epsilon():
    pytest.importorskip("opacus")
    model = lenet(size=32)
    images, labels = photos(2, size=32)
    obs = ThreatModelVictim.from_tensors(model, images, labels, client=DPSGDClient(1.0, 1.0, seed=0)).observation
    assert obs.metadata["threat_model"] == "dpsgd" and obs.metadata["dp_epsilon"] == pytest.approx(4.7285, rel=1e-3)


def test_bad_threat_model_parameters_fail_clearly():
    model = lenet(size=32)
    images, labels = photos(2, size=32)
    with pytest.raises(ValueError, match="local_steps must be an int >= 1"):
        FedAvgClient(local_steps=0)
    with pytest.raises(ValueError, match="local_lr must be > 0"):
        FedAvgClient(local_lr=-0.1)
    with pytest.raises(ValueError, match="local_batch_size"):
        FedAvgClient(local_batch_size=0)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        ThreatModelVictim(model, aggregation="median")
    with pytest.raises(ValueError, match="num_clients must be an int >= 1"):
        ThreatModelVictim(model, num_clients=0)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        ThreatModelVictim.from_tensors(model, images[:1].repeat(3, 1, 1, 1), labels[:1].repeat(3), num_clients=2)
    with pytest.raises(ValueError, match="sum to 3 but the observation's batch_size is 2"):
        UpdateSpec.from_metadata({"threat_model": "fedavg", "client_batch_sizes": "1,2"}, 2)


# ------------------------------------------------------------------------------- attacks on updates
def _bound_attack(attack, dm):
    dm.setup()
    return attack.bind(dm.attack_inputs())


def test_attack_matches_exactly_at_the_true_batch():
    model = lenet(size=16)
    images, labels = photos(4, size=16)
    dm = ThreatModelVictim.from_tensors(
        model, images, labels, client=FedAvgClient(3, 0.1, 1), num_clients=2, aggregation="sum"
    )
    attack = _bound_attack(FedAvgIDLG(label_strategy=None, seed=0), dm)
    attack.register_buffer("labels", labels.clone())
    with torch.enable_grad():
        at_truth = attack.matching_distance(attack.victim_gradients(images, labels)).item()
        at_init = attack.matching_distance(attack.victim_gradients(attack.dummy_images, labels)).item()
    assert at_truth < 1e-10 * at_init and at_init > 0
    # normalised: the target is the update / -lr
    spec = attack.threat_model
    raw = simulate_shared_update(model, images, labels, spec)
    torch.testing.assert_close(attack._target_gradients[0], raw[0] / (-0.1 * 3), atol=1e-6, rtol=1e-5)  # / (-lr * E)


def test_explicit_hyperparameters_for_an_observation_without_metadata():
    model = lenet(size=16)
    images, labels = photos(2, size=16)
    update, _ = unrolled_update(model, images, labels, 2, 0.1)
    obs = GradientObservation(gradients=update, batch_size=2)
    inputs = AttackInputs(model, obs, (3, 16, 16), torch.zeros(3, 1, 1), torch.ones(3, 1, 1), 10)
    attack = FedAvgIDLG(threat_model=ThreatModel("fedavg", local_steps=2, local_lr=0.1)).bind(inputs)
    assert sorted(attack.labels.tolist()) == sorted(labels.tolist())  # iDLG rule on the pseudo-gradient
    with torch.enable_grad():
        assert attack.matching_distance(attack.victim_gradients(images, labels)).item() < 1e-10
    plain = FedAvgIDLG().bind(inputs)  # without the hyperparameters it would be matched as a gradient
    assert plain.threat_model.threat_model == "fedsgd"


def _psnr(images, truth):
    return reconstruction_metrics(images, truth)["psnr"]


def test_fedavg_attack_recovers_a_single_client(tmp_path):
    model = lenet(size=16)
    images, labels = photos(1, size=16)
    dm = ThreatModelVictim.from_tensors(model, images, labels, client=FedAvgClient(local_steps=3, local_lr=0.1))
    attack = FedAvgIDLG(seed=0)
    lean_trainer(20, tmp_path).fit(attack, datamodule=dm)
    rec = attack.reconstruction()
    start = dm.attack_inputs().to_image_space(attack.initial_images(torch.Generator().manual_seed(0))).clamp(0, 1)
    assert rec["labels"].tolist() == labels.tolist()
    assert _psnr(rec["images"], images) > _psnr(start, images) + 15  # measured: 40 dB vs 6.5 dB


def test_fedavg_attack_on_two_aggregated_clients(tmp_path):
    model = lenet(size=16)
    images, labels = photos(2, size=16)
    dm = ThreatModelVictim.from_tensors(
        model, images, labels, client=FedAvgClient(local_steps=2, local_lr=0.1), num_clients=2, aggregation="mean"
    )
    attack = FedAvgIDLG(seed=0)
    lean_trainer(20, tmp_path).fit(attack, datamodule=dm)
    rec = attack.reconstruction()
    start = dm.attack_inputs().to_image_space(attack.initial_images(torch.Generator().manual_seed(0))).clamp(0, 1)
    assert sorted(rec["labels"].tolist()) == sorted(labels.tolist())
    assert _psnr(rec["images"], images) > _psnr(start, images) + 8


def test_fedavg_dlg_runs_with_soft_labels(tmp_path):
    model = lenet(size=16)
    images, labels = photos(1, size=16)
    dm = ThreatModelVictim.from_tensors(model, images, labels, client=FedAvgClient(local_steps=2, local_lr=0.1))
    attack = FedAvgDLG(seed=0)
    lean_trainer(3, tmp_path).fit(attack, datamodule=dm)
    assert attack.reconstruction()["images"].shape == (1, 3, 16, 16)


# ------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config", ["configs/fedavg_lenet.yaml", "configs/idlg_lenet_defended.yaml"])
def test_configs_run_as_is(tmp_path, config):
    from lightning_gi.cli import run

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = run([
            "fit", "--config", str(ROOT / config), "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ])
    dm = cli.datamodule
    source = yaml.safe_load((ROOT / config).read_text())
    if "fedavg" in config:
        assert isinstance(dm.client, FedAvgClient) and dm.client.local_steps == 4 and dm.num_clients == 2
        assert dm.observation.metadata["threat_model"] == "fedavg" and dm.observation.batch_size == 4
        # FedAvg is a property of the observation: the plain IDLG attack reads it
        assert type(cli.model).__name__ == "IDLG" and cli.model.threat_model.client_batch_sizes == [2, 2]
    else:
        kinds = [type(d).__name__ for d in dm.defenses]
        assert kinds == [d["class_path"].rsplit(".", 1)[1] for d in source["data"]["init_args"]["defenses"]]
        zeros = sum(int((g == 0).sum()) for g in dm.observation.gradients)
        assert zeros == 0  # noise after pruning fills the zeros: the order of the list matters
    assert list(tmp_path.glob("*/version_0/metrics.json"))


def test_fedsgd_client_matches_client_gradients():
    model = lenet(size=32)
    images, labels = photos(2, size=32)
    for a, b in zip(FedSGDClient()(model, images, labels), client_gradients(model, images, labels)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_one_fedsgd_client_equals_the_foundation_capture():
    from lightning_gi.observation import capture_observation

    model = lenet(size=32)
    images, labels = photos(2, size=32)
    defenses = [GaussianNoise(std=1e-2, seed=5)]
    ours = ThreatModelVictim.from_tensors(model, images, labels, defenses=defenses).observation
    ref = capture_observation(model, images, labels, defenses=defenses)
    for a, b in zip(ours.gradients, ref.gradients):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_metadata_carries_nothing_that_rebuilds_the_private_batch():
    """Issue 11 item 8: no dataset indices, batch seed or defense noise seed in the observation (the noise seed
    would let the server regenerate and subtract each client's noise); the hyperparameters stay."""
    model = reinitialise(LeNet(num_classes=14, image_size=16), 0)  # the photographs have 14 classes
    dm = ThreatModelVictim(
        model, client=FedAvgClient(2, 0.1, 1), num_clients=2, dataset="photographs", batch_size=2, batch_seed=48611,
        image_shape=(3, 16, 16), defenses=[GaussianNoise(std=0.01, seed=7919)],
    )
    dm.setup()
    meta = dm.observation.metadata
    assert not any("indic" in k or "index" in k or "seed" in k for k in meta)
    assert not any(isinstance(v, str) and ("48611" in v or "7919" in v or "seed" in v) for v in meta.values())
    assert meta["defenses"].startswith("GaussianNoise(") and "std=0.01" in meta["defenses"]
    assert meta["client_batch_sizes"] == "2,2" and meta["local_steps"] == 2 and meta["local_lr"] == 0.1
    assert dm.ground_truth().images.shape == (4, 3, 16, 16)  # the metrics still get the batch


# ------------------------------------------------------------------------------- FedAvg is a property of the observation
def test_every_attack_matches_a_fedavg_update_through_the_one_client_simulation():
    """Plain IDLG, DLG and Inverting Gradients (not FedAvg subclasses) read the threat model from the
    observation's metadata: at the true batch their matching distance is ~0, at their random start it is not."""
    from lightning_gi.attacks import DLG, IDLG, InvertingGradients

    model = lenet(size=16)
    images, labels = photos(2, size=16)
    dm = ThreatModelVictim.from_tensors(model, images, labels, client=FedAvgClient(3, 0.1, 1), share_labels=True)
    dm.setup()
    for attack in (IDLG(label_strategy=SharedLabels()), InvertingGradients(label_strategy=SharedLabels(), restarts=1), DLG()):
        attack.bind(dm.attack_inputs())
        assert attack.threat_model.threat_model == "fedavg" and attack.threat_model.local_steps == 3
        targets = labels if getattr(attack, "labels", None) is not None else torch.nn.functional.one_hot(labels, 10).float()
        with torch.enable_grad():
            at_truth = attack.update_distance(images, targets)
            start = attack.initial_images(torch.Generator().manual_seed(0))
            at_start = attack.update_distance(start, targets)
        assert at_truth < 1e-5 * at_start, type(attack).__name__  # cosine (IG): float32 rounding ~1e-7


def test_fedsgd_observation_keeps_the_single_gradient_fast_path():
    from lightning_gi.attacks import IDLG

    model = lenet(size=16)
    images, labels = photos(2, size=16)
    dm = ThreatModelVictim.from_tensors(model, images, labels)
    dm.setup()
    attack = IDLG().bind(dm.attack_inputs())
    assert attack.threat_model.is_single_gradient and attack.threat_model.pseudo_gradient_scale == 1.0
    with torch.enable_grad():
        assert attack.update_distance(images, labels) < 1e-12
