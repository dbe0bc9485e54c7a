"""A real Flower federation (flwr's simulation engine on Ray, not a mock) audited by lightning_gi.

One simulation (module fixture) runs three federations of 2 clients holding 2 private photographs each:
"plain", a CNN for 2 rounds (round 1: one full-batch local step, FedSGD-like; round 2: 3 local steps of
1 image); "fedavg", 1 round of multi-step FedAvg (3 full-batch local steps) from the initial weights; "bn",
a BatchNorm CNN for 1 round. The capture wrapper writes their updates; the tests check the files and
attack them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_gi.attacks.fedavg import FedAvgIDLG
from lightning_gi.integrations.audit_models import AuditCNN
from lightning_gi.integrations.capture import (
    build_update_observation,
    load_update_buffers,
    recover_bn_statistics,
    set_bn_targets,
    update_metadata,
)
from lightning_gi.metrics import reconstruction_metrics
from lightning_gi.objectives.priors import BNStatisticsPrior
from lightning_gi.observation import GradientObservation, ObservationError
from lightning_gi.victim.datamodule import ObservationFileVictim

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 14


class _LazyApp:
    """The example app (examples/flower_audit/app.py), imported on first use: it needs the [flower] extra."""

    def __getattr__(self, name):
        pytest.importorskip("flwr")
        sys.path.insert(0, str(ROOT / "examples" / "flower_audit"))
        import app

        return getattr(app, name)


flower_app = _LazyApp()

TRAIN_CONFIG = {"lr": 0.1, "local-steps": 1, "batch-size": 0}
ROUND_2 = {"local-steps": 3, "batch-size": 1}
FEDAVG = {"lr": 0.1, "local-steps": 3, "batch-size": 0}
SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    pytest.importorskip("flwr")
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from lightning_gi.integrations.flower import captured_bn_statistics  # noqa: F401  (the extra imports)

    out = tmp_path_factory.mktemp("flower")
    plain, fedavg, bn = out / "plain", out / "fedavg", out / "bn"
    server = ServerApp()

    @server.main()
    def main(grid, context):
        flower_app.run_federation(grid, str(plain), num_clients=2, num_rounds=2, train_config=TRAIN_CONFIG,
                                  round_configs={2: ROUND_2})
        flower_app.run_federation(grid, str(fedavg), num_clients=2, num_rounds=1, train_config=FEDAVG)
        flower_app.run_federation(grid, str(bn), num_clients=2, num_rounds=1, train_config=TRAIN_CONFIG, batch_norm=True)

    start = time.time()
    run_simulation(server, flower_app.make_client_app(str(out)), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}})
    print(f"\nFlower simulation: {time.time() - start:.1f} s")
    return {"plain": plain, "fedavg": fedavg, "bn": bn, "private": out / "private"}


def _entries(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "captures.jsonl").read_text().splitlines()]


def _private(federation, entry) -> dict:
    return torch.load(federation["private"] / f"node_{entry['client_id']}.pt", weights_only=True)


def _partition(federation, entry) -> int:
    """Which data partition the client held (Flower's node ids are random; partitions are not)."""
    images = _private(federation, entry)["images"]
    return next(p for p in (0, 1) if torch.equal(flower_app.client_data(p, 2, 2)[0], images))


def _entry(federation, name, server_round, partition=0) -> dict:
    return next(e for e in _entries(federation[name]) if e["round"] == server_round and _partition(federation, e) == partition)


def _model(entry, batch_norm=False) -> AuditCNN:
    model = AuditCNN(num_classes=NUM_CLASSES, image_size=16, batch_norm=batch_norm)
    model.load_state_dict(torch.load(entry["weights"], weights_only=True))
    return model


# ------------------------------------------------------------------------------------------- without Flower
def _bn_model():
    torch.manual_seed(0)
    return AuditCNN(num_classes=NUM_CLASSES, image_size=16, batch_norm=True)


def test_old_format_version_1_files_still_load_and_buffers_need_version_2(tmp_path):
    model = _bn_model()
    grads = [torch.zeros_like(p) for p in model.parameters()]
    torch.save({"format_version": 1, "gradients": grads, "batch_size": 2}, tmp_path / "v1.pt")
    old = GradientObservation.load(tmp_path / "v1.pt")
    assert old.buffers is None and old.batch_size == 2
    old.save(tmp_path / "again.pt")  # no buffers: still written as version 1 (older readers keep working)
    assert torch.load(tmp_path / "again.pt", weights_only=True)["format_version"] == 1
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    GradientObservation(grads, 2, buffers=buffers).save(tmp_path / "v2.pt")
    raw = torch.load(tmp_path / "v2.pt", weights_only=True)
    assert raw["format_version"] == 2
    loaded = GradientObservation.load(tmp_path / "v2.pt")
    assert loaded.buffers.keys() == buffers.keys() and all(torch.equal(loaded.buffers[k], buffers[k]) for k in buffers)
    torch.save({"format_version": 1, "gradients": grads, "batch_size": 2, "buffers": buffers}, tmp_path / "bad.pt")
    with pytest.raises(ObservationError, match="need format_version 2"):
        GradientObservation.load(tmp_path / "bad.pt")
    with pytest.raises(ObservationError, match="NaN"):
        GradientObservation(grads, 2, buffers={"body.1.running_mean": torch.full((12,), float("nan"))})
    with pytest.raises(ObservationError, match="torch.Tensor"):
        GradientObservation(grads, 2, buffers={"body.1.running_mean": [0.0]})


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_bn_batch_statistics_recovered_exactly_from_one_train_mode_step(momentum):
    model = _bn_model()
    model.body[1].momentum = momentum
    before = {n: b.clone() for n, b in model.named_buffers()}
    images = torch.rand(3, *SHAPE)
    model.train()
    with torch.no_grad():
        x = model.body[0](images)
        model(images)  # one train-mode forward moves the running statistics, as one local step does
    after = {n: b.clone() for n, b in model.named_buffers()}
    glob = build_update_observation(before | dict(model.named_parameters()), after | dict(model.named_parameters()),
                                    {}, 3)[0]
    assert set(glob.buffers) == set(after)
    (mean, var), = recover_bn_statistics(model, before, glob.buffers, [3 * 8 * 8])
    assert torch.allclose(mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(var, x.var(dim=(0, 2, 3), unbiased=False), atol=1e-5)


def test_hyperparameters_are_read_from_the_server_config():
    meta = update_metadata({"lr": 0.05, "local-epochs": 2, "batch-size": 2, "note": "x", "ids": [1, 2]}, 5, 3, "17")
    assert meta["local_lr"] == 0.05 and meta["local_steps"] == 2 * 3 and meta["local_batch_size"] == 2
    assert meta["config.note"] == "x" and "config.ids" not in meta and meta["round"] == 3 and meta["client_id"] == "17"
    assert update_metadata({"lr": 0.1, "batch-size": 8}, 5, 1, "0")["local_batch_size"] == 0  # full batch
    assert update_metadata({}, 5, 1, "0", update="gradient")["threat_model"] == "fedsgd"
    with pytest.raises(ValueError, match="no learning rate"):
        update_metadata({"local-steps": 2}, 5, 1, "0")


# ------------------------------------------------------------------------------------------- the files
def test_one_observation_per_client_per_round(federation):
    for name, rounds in (("plain", 2), ("fedavg", 1), ("bn", 1)):
        entries = _entries(federation[name])
        assert sorted((e["round"], e["label"]) for e in entries) == [(r, k) for r in range(1, rounds + 1) for k in ("00", "01")]
        assert len({e["client_id"] for e in entries}) == 2
        for e in entries:
            raw = torch.load(e["observation"], weights_only=True)  # plain tensors and containers only
            obs = GradientObservation.load(e["observation"])
            model = _model(e, batch_norm=name == "bn")
            obs.check_against(model, num_classes=NUM_CLASSES)
            assert raw["param_names"] == [n for n, _ in model.named_parameters()]
            assert obs.batch_size == 2 and e["num_examples"] == 2


def test_metadata_equals_what_the_server_sent(federation):
    for e in _entries(federation["plain"]) + _entries(federation["fedavg"]):
        meta = GradientObservation.load(e["observation"]).metadata
        base = FEDAVG if "fedavg" in e["observation"] else {**TRAIN_CONFIG, **(ROUND_2 if e["round"] == 2 else {})}
        sent = {**base, "batch-norm": False, "server-round": e["round"]}
        got = {k[len("config."):]: v for k, v in meta.items() if k.startswith("config.")}
        assert got == sent and all(type(got[k]) is type(sent[k]) for k in sent)  # typed: int stays int
        assert meta["round"] == e["round"] and meta["client_id"] == e["client_id"] and meta["num_examples"] == 2
        assert meta["threat_model"] == "fedavg" and meta["update_kind"] == "weight_delta"
        assert meta["normalization"] == "none"  # stated by the app's owner in CaptureStrategy
        assert meta["local_lr"] == sent["lr"] and isinstance(meta["local_lr"], float)
        assert meta["local_steps"] == sent["local-steps"] and isinstance(meta["local_steps"], int)
        assert meta["local_batch_size"] == sent["batch-size"]


def test_captured_update_is_the_clients_weight_delta_and_holds_no_private_data(federation):
    for e in _entries(federation["plain"]):
        raw = torch.load(e["observation"], weights_only=True)
        assert "labels" not in raw and "train-loss" not in json.dumps(raw["metadata"])
        assert set(raw) <= {"format_version", "gradients", "batch_size", "loss_reduction", "metadata", "param_names"}
        allowed = {"source", "round", "client_id", "num_examples", "update_kind", "normalization", "threat_model",
                   "local_lr", "local_steps", "local_batch_size", "aggregation"}
        assert {k for k in raw["metadata"] if not k.startswith("config.")} <= allowed
        private = _private(federation, e)
        meta = raw["metadata"]
        model = _model(e)
        before = [p.detach().clone() for p in model.parameters()]
        flower_app.local_training(model, private["images"], private["labels"], meta["local_lr"], meta["local_steps"],
                                  meta["local_batch_size"])
        for got, p, p0 in zip(raw["gradients"], model.parameters(), before):
            assert torch.allclose(got, p.detach() - p0, atol=1e-6)
        flat = torch.cat([g.flatten() for g in raw["gradients"]])
        pixels = private["images"].flatten()
        assert not any(torch.equal(g.flatten()[: pixels.numel()], pixels) for g in raw["gradients"] if g.numel() >= pixels.numel())
        assert flat.numel() == sum(p.numel() for p in model.parameters())  # nothing but the update


# ------------------------------------------------------------------------------------------- attacks
def _attack(entry, steps, tmp_path):
    dm = ObservationFileVictim(AuditCNN(num_classes=NUM_CLASSES, image_size=16), entry["observation"],
                               weights_path=entry["weights"], image_shape=SHAPE, num_classes=NUM_CLASSES)
    attack = FedAvgIDLG(seed=0)
    pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(tmp_path)).fit(attack, datamodule=dm)
    start = dm.attack_inputs().to_image_space(attack.initial_images(torch.Generator().manual_seed(0))).clamp(0, 1)
    return attack.reconstruction(), start


def test_fedsgd_like_capture_is_inverted(federation, tmp_path):
    entry = _entry(federation, "plain", 1)
    truth = _private(federation, entry)
    rec, start = _attack(entry, 15, tmp_path)
    # one full-batch step is symmetric in the batch order: the labels are recovered as a multiset
    assert sorted(rec["labels"].tolist()) == sorted(truth["labels"].tolist())
    psnr, psnr0 = reconstruction_metrics(rec["images"], truth["images"])["psnr"], reconstruction_metrics(start, truth["images"])["psnr"]
    print(f"FedSGD-like captured update: PSNR {psnr:.1f} dB (start {psnr0:.1f} dB)")
    assert psnr > psnr0 + 10


@pytest.mark.parametrize(
    "steps, gain", [(12, 4.0), pytest.param(40, 12.0, marks=pytest.mark.slow)], ids=["12-steps", "40-steps"]
)
def test_multi_step_fedavg_capture_is_inverted(federation, tmp_path, steps, gain):
    entry = _entry(federation, "fedavg", 1)
    truth = _private(federation, entry)
    rec, start = _attack(entry, steps, tmp_path)
    assert sorted(rec["labels"].tolist()) == sorted(truth["labels"].tolist())
    psnr, psnr0 = reconstruction_metrics(rec["images"], truth["images"])["psnr"], reconstruction_metrics(start, truth["images"])["psnr"]
    print(f"3-step FedAvg captured update, {steps} attack steps: PSNR {psnr:.1f} dB (start {psnr0:.1f} dB)")
    assert psnr > psnr0 + gain


# ------------------------------------------------------------------------------------------- BN leak
def test_bn_statistics_recovered_from_a_captured_update(federation):
    for entry in _entries(federation["bn"]):
        model = _model(entry, batch_norm=True)
        assert load_update_buffers(entry["observation"]), "the BN running statistics were not captured"
        from lightning_gi.integrations.flower import captured_bn_statistics

        recovered = captured_bn_statistics(model, entry["observation"], entry["weights"], SHAPE)
        images = _private(federation, entry)["images"]
        with torch.no_grad():
            x = model.body[0](images)  # the BN layer's input on the client's batch
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        assert len(recovered) == 1
        assert torch.allclose(recovered[0][0], mean, atol=1e-5, rtol=1e-4)
        assert torch.allclose(recovered[0][1], var, atol=1e-5, rtol=1e-4)
        # offered as the BN prior's targets: the prior vanishes at the client's true batch
        set_bn_targets(model, recovered)
        prior = BNStatisticsPrior().attach(model)
        model.train()
        state = {**dict(model.named_parameters()), **{n: b.clone() for n, b in model.named_buffers()}}
        torch.func.functional_call(model, state, (images,))
        assert float(prior()) < 1e-3
        prior.detach()


# ------------------------------------------------------------------------------------------- slow: more Flower runs
@pytest.mark.slow
def test_flower_fixed_clipping_mod_is_captured_as_the_server_sees_it(tmp_path):
    """Flower's client-side fixed clipping (fixedclipping_mod + DifferentialPrivacyClientSideFixedClipping):
    the captured delta is the clipped one, and the clipping norm the server sent is in the metadata."""
    pytest.importorskip("flwr")
    from flwr.simulation import run_simulation

    clip = 0.05
    out = tmp_path / "clip"
    server = flower_app.make_server_app(str(out), num_clients=2, num_rounds=1, train_config=TRAIN_CONFIG,
                                        clip_norm=clip, noise_multiplier=0.0)
    run_simulation(server, flower_app.make_client_app(str(tmp_path), fixed_clipping=True), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}})
    entries = _entries(out)
    assert len(entries) == 2
    for e in entries:
        obs = GradientObservation.load(e["observation"])
        assert obs.metadata["config.clipping_norm"] == clip
        norm = float(torch.cat([g.flatten() for g in obs.gradients]).norm())
        assert norm <= clip * (1 + 1e-4)


@pytest.mark.slow
def test_legacy_strategy_aggregate_fit_path_is_captured(tmp_path):
    """The legacy flwr.server.strategy API (NumPyClient, FedAvg.aggregate_fit) through LegacyCaptureStrategy."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from lightning_gi.integrations.flower import LegacyCaptureStrategy

    out = tmp_path / "legacy"
    template = flower_app.build_model()
    keys = list(template.state_dict())

    class Client(NumPyClient):
        def __init__(self, partition):
            self.partition = partition

        def fit(self, parameters, config):
            model = flower_app.build_model()
            model.load_state_dict({k: torch.as_tensor(v) for k, v in zip(keys, parameters)})
            images, labels = flower_app.client_data(self.partition, 2, 2)
            flower_app.local_training(model, images, labels, float(config["lr"]), int(config["local-steps"]), 0)
            return [v.detach().numpy() for v in model.state_dict().values()], 2, {}

    def client_fn(context):
        return Client(int(context.node_config["partition-id"])).to_client()

    def server_fn(context):
        strategy = LegacyFedAvg(
            fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
            on_fit_config_fn=lambda r: {"lr": 0.1, "local-steps": 1},
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in template.state_dict().values()]),
        )
        return ServerAppComponents(strategy=LegacyCaptureStrategy(strategy, out, template), config=ServerConfig(num_rounds=1))

    run_simulation(ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}})
    entries = _entries(out)
    assert len(entries) == 2
    for e in entries:
        obs = GradientObservation.load(e["observation"])
        assert obs.metadata["local_lr"] == 0.1 and obs.metadata["local_steps"] == 1 and obs.metadata["threat_model"] == "fedavg"
        assert obs.param_names == [n for n, _ in template.named_parameters()]
        assert float(torch.cat([g.flatten() for g in obs.gradients]).abs().max()) > 0


def test_captured_update_victim_offers_the_recovered_statistics_as_bn_prior_targets(federation):
    from lightning_gi.integrations.capture import CapturedUpdateVictim

    entry = _entries(federation["bn"])[0]
    dm = CapturedUpdateVictim(
        AuditCNN(num_classes=NUM_CLASSES, image_size=16, batch_norm=True), entry["observation"],
        weights_path=entry["weights"], image_shape=SHAPE, num_classes=NUM_CLASSES, train_mode=True,
        bn_targets=True,
    )
    dm.setup("fit")
    images = _private(federation, entry)["images"]
    truth = _model(entry, batch_norm=True)
    with torch.no_grad():
        x = truth.body[0](images)
    bn = dm.model.body[1]
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert torch.allclose(bn.running_var, x.var(dim=(0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="train_mode=True"):
        CapturedUpdateVictim(AuditCNN(batch_norm=True), entry["observation"], image_shape=SHAPE, bn_targets=True)
