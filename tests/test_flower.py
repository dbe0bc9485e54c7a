"""A real Flower federation (flwr's simulation engine on Ray, not a mock) audited by lightning_gi.

One simulation (module fixture) runs two federations of 2 clients holding 2 private photographs each:
a plain CNN for 2 rounds (round 1: one full-batch local step, FedSGD-like; round 2: 2 local steps of one
image each) and a BatchNorm CNN for 1 round. The capture wrapper writes their updates; the tests check
the files and attack them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

pytest.importorskip("flwr")

from flwr.serverapp import ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from lightning_gi.attacks.fedavg import FedAvgIDLG  # noqa: E402
from lightning_gi.integrations.audit_models import AuditCNN  # noqa: E402
from lightning_gi.integrations.capture import load_update_buffers, set_bn_targets  # noqa: E402
from lightning_gi.integrations.flower import captured_bn_statistics  # noqa: E402
from lightning_gi.metrics import reconstruction_metrics  # noqa: E402
from lightning_gi.objectives.priors import BNStatisticsPrior  # noqa: E402
from lightning_gi.observation import GradientObservation  # noqa: E402
from lightning_gi.victim.datamodule import ObservationFileVictim  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "flower_audit"))
import app as flower_app  # noqa: E402

TRAIN_CONFIG = {"lr": 0.1, "local-steps": 1, "batch-size": 0}
ROUND_2 = {"local-steps": 2, "batch-size": 1}
SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("flower")
    plain, bn = out / "plain", out / "bn"
    server = ServerApp()

    @server.main()
    def main(grid, context):
        flower_app.run_federation(grid, str(plain), num_clients=2, num_rounds=2, train_config=TRAIN_CONFIG,
                                  round_configs={2: ROUND_2})
        flower_app.run_federation(grid, str(bn), num_clients=2, num_rounds=1, train_config=TRAIN_CONFIG, batch_norm=True)

    start = time.time()
    run_simulation(server, flower_app.make_client_app(str(out)), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}})
    print(f"\nFlower simulation: {time.time() - start:.1f} s")
    return {"plain": plain, "bn": bn, "private": out / "private"}


def _entries(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "captures.jsonl").read_text().splitlines()]


def _private(federation, entry) -> dict:
    return torch.load(federation["private"] / f"node_{entry['client_id']}.pt", weights_only=True)


def _model(entry, batch_norm=False) -> AuditCNN:
    model = AuditCNN(num_classes=flower_app.NUM_CLASSES, image_size=16, batch_norm=batch_norm)
    model.load_state_dict(torch.load(entry["weights"], weights_only=True))
    return model


# ------------------------------------------------------------------------------------------- the files
def test_one_observation_per_client_per_round(federation):
    for name, rounds in (("plain", 2), ("bn", 1)):
        entries = _entries(federation[name])
        assert sorted((e["round"], e["label"]) for e in entries) == [(r, k) for r in range(1, rounds + 1) for k in ("00", "01")]
        assert len({e["client_id"] for e in entries}) == 2
        for e in entries:
            raw = torch.load(e["observation"], weights_only=True)  # plain tensors and containers only
            obs = GradientObservation.load(e["observation"])
            model = _model(e, batch_norm=name == "bn")
            obs.check_against(model, num_classes=flower_app.NUM_CLASSES)
            assert raw["param_names"] == [n for n, _ in model.named_parameters()]
            assert obs.batch_size == 2 and e["num_examples"] == 2


def test_metadata_equals_what_the_server_sent(federation):
    for e in _entries(federation["plain"]):
        meta = GradientObservation.load(e["observation"]).metadata
        sent = {**TRAIN_CONFIG, **(ROUND_2 if e["round"] == 2 else {}), "batch-norm": False, "server-round": e["round"]}
        assert {k[len("config."):]: v for k, v in meta.items() if k.startswith("config.")} == sent
        assert meta["round"] == e["round"] and meta["client_id"] == e["client_id"] and meta["num_examples"] == 2
        assert meta["threat_model"] == "fedavg" and meta["update_kind"] == "weight_delta"
        assert meta["local_lr"] == sent["lr"] and isinstance(meta["local_lr"], float)
        assert meta["local_steps"] == sent["local-steps"] and isinstance(meta["local_steps"], int)
        assert meta["local_batch_size"] == sent["batch-size"]


def test_captured_update_is_the_clients_weight_delta_and_holds_no_private_data(federation):
    for e in _entries(federation["plain"]):
        raw = torch.load(e["observation"], weights_only=True)
        assert "labels" not in raw and "train-loss" not in json.dumps(raw["metadata"])
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
    dm = ObservationFileVictim(AuditCNN(num_classes=flower_app.NUM_CLASSES, image_size=16), entry["observation"],
                               weights_path=entry["weights"], image_shape=SHAPE, num_classes=flower_app.NUM_CLASSES)
    attack = FedAvgIDLG(seed=0)
    pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(tmp_path)).fit(attack, datamodule=dm)
    start = dm.attack_inputs().to_image_space(attack.initial_images(torch.Generator().manual_seed(0))).clamp(0, 1)
    return attack.reconstruction(), start


def test_fedsgd_like_capture_is_inverted(federation, tmp_path):
    entry = next(e for e in _entries(federation["plain"]) if e["round"] == 1)
    truth = _private(federation, entry)
    rec, start = _attack(entry, 12, tmp_path)
    # one full-batch step is symmetric in the batch order: the labels are recovered as a multiset
    assert sorted(rec["labels"].tolist()) == sorted(truth["labels"].tolist())
    psnr, psnr0 = reconstruction_metrics(rec["images"], truth["images"])["psnr"], reconstruction_metrics(start, truth["images"])["psnr"]
    print(f"FedSGD-like captured update: PSNR {psnr:.1f} dB (start {psnr0:.1f} dB)")
    assert psnr > psnr0 + 10


@pytest.mark.parametrize(
    "steps, gain", [(10, 5.0), pytest.param(40, 15.0, marks=pytest.mark.slow)], ids=["10-steps", "40-steps"]
)
def test_multi_step_fedavg_capture_is_inverted(federation, tmp_path, steps, gain):
    entry = next(e for e in _entries(federation["plain"]) if e["round"] == 2)
    truth = _private(federation, entry)
    rec, start = _attack(entry, steps, tmp_path)
    assert rec["labels"].tolist() == truth["labels"].tolist()  # 1 image per step: the order is recovered too
    psnr, psnr0 = reconstruction_metrics(rec["images"], truth["images"])["psnr"], reconstruction_metrics(start, truth["images"])["psnr"]
    print(f"2-step FedAvg captured update, {steps} attack steps: PSNR {psnr:.1f} dB (start {psnr0:.1f} dB)")
    assert psnr > psnr0 + gain


# ------------------------------------------------------------------------------------------- BN leak
def test_bn_statistics_recovered_from_a_captured_update(federation):
    for entry in _entries(federation["bn"]):
        model = _model(entry, batch_norm=True)
        assert load_update_buffers(entry["observation"]), "the BN running statistics were not captured"
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
