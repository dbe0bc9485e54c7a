"""Sharding one inversion over processes (gloo on CPU, 2 and 4 ranks) and vectorised restarts.

* per-rank shard gradients == the slices of the single-process full-batch gradient (float64, 1e-10), with the
  TV, L2 and BN-statistics priors on a victim with BatchNorm, and with DLG's soft labels;
* a short run through the Trainer with ``strategy="gi_shard"``, ``devices=2`` ends in the single-process
  reconstruction (same seed), written once by rank 0;
* restarts over ranks (``gi_restarts``) pick the same winner as the single-process restarts;
* vectorised restarts (one batched computation) give the sequential restarts' losses and iterates.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_gi.attacks import DLG, ImagePriorAttack, VectorisedRestartsAttack
from lightning_gi.distributed import GIShardStrategy, Shard, split_range
from lightning_gi.labels import SharedLabels
from lightning_gi.objectives import CosineDistance, SquaredL2Distance
from lightning_gi.objectives.priors import BNStatisticsPrior, L2ImageNorm, TotalVariation
from lightning_gi.observation import capture_observation
from lightning_gi.victim import LeNet, TensorBatchVictim
from lightning_gi.victim.datamodule import AttackInputs

pytestmark = pytest.mark.distributed

BATCH = 5  # uneven shards on purpose: 3+2 on 2 ranks, 2+1+1+1 on 4


# ----------------------------------------------------------------------------------------------------
# helpers (module level, used by the forked workers)
# ----------------------------------------------------------------------------------------------------
class TinyBNNet(nn.Module):
    """Two conv + BatchNorm blocks (eval mode, non-trivial running statistics) and a linear head."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        )
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def _bn_inputs(dtype=torch.float64) -> AttackInputs:
    torch.manual_seed(0)
    model = TinyBNNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    model = model.to(dtype).eval()
    images = torch.rand(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    labels = torch.tensor([0, 3, 1, 3, 5])
    obs = capture_observation(model, images, labels, share_labels=True)
    c = torch.zeros(3, 1, 1, dtype=dtype)
    return AttackInputs(model, obs, (3, 8, 8), c, c + 1, 6)


def _image_attack(shard=None, distance=None, cls=ImagePriorAttack) -> ImagePriorAttack:
    priors = [TotalVariation(weight=0.3), L2ImageNorm(weight=0.2)]
    if cls is ImagePriorAttack:  # (vectorised restarts do not support the BN prior)
        priors.append(BNStatisticsPrior(weight=0.05, first_bn_multiplier=3.0))
    attack = cls(
        label_strategy=SharedLabels(),
        distance=distance if distance is not None else SquaredL2Distance(),
        priors=priors,
        restarts=2,
        seed=3,
    )
    attack.shard = shard
    return attack.bind(_bn_inputs()).double()


def _dlg_attack(shard=None) -> DLG:
    attack = DLG(seed=4)
    attack.shard = shard
    return attack.bind(_bn_inputs()).double()


_BUILDERS = {
    "image": _image_attack,
    "cosine": lambda s: _image_attack(s, CosineDistance()),
    "dlg": _dlg_attack,
    "vectorised": lambda s: _image_attack(s, CosineDistance(), VectorisedRestartsAttack),
}


def _loss_and_grads(attack) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = attack.evaluate()[0]
    loss.backward(inputs=attack._unknowns)
    return loss.detach(), [p.grad.detach().clone() for p in attack._unknowns]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)


def _spawn(fn, world: int, *args) -> None:
    # fork: the children inherit the imported modules (a spawned child would re-import torch + Lightning, 10-20 s
    # on a loaded 2-core machine); the parent runs torch with one thread, so forking is safe.
    context = mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, start_method="fork", join=False)
    deadline = time.monotonic() + 150
    while not context.join(timeout=1):
        if time.monotonic() > deadline:  # a collective mismatch hangs: fail instead of blocking CI
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"{fn.__name__} on {world} processes did not finish within 150 s")


# ----------------------------------------------------------------------------------------------------
# 1. shard gradients == slices of the full-batch gradient (float64)
# ----------------------------------------------------------------------------------------------------
def _gradient_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = Shard(rank=rank, world_size=world)
        results = {}
        for name, build in _BUILDERS.items():
            results[name] = _loss_and_grads(build(shard))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_shard_gradients_equal_full_batch_slices(world, tmp_path):
    _spawn(_gradient_worker, world, str(tmp_path))
    full = {name: _loss_and_grads(build(None)) for name, build in _BUILDERS.items()}
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        start, stop = split_range(BATCH, world, rank)
        for name, (loss, grads) in full.items():
            shard_loss, shard_grads = got[name]
            assert abs(float(shard_loss - loss)) <= 1e-10 * max(1.0, abs(float(loss))), (name, rank)
            # image attacks: unknowns [R, N, C, H, W] (batch dim 1); DLG: images [N, ...], label logits [N, K]
            for g_full, g_shard in zip(grads, shard_grads):
                ref = g_full[:, start:stop] if name != "dlg" else g_full[start:stop]
                assert g_shard.shape == ref.shape
                assert float((g_shard - ref).abs().max()) <= 1e-10, (name, rank, float((g_shard - ref).abs().max()))


# ----------------------------------------------------------------------------------------------------
# 2. a short sharded run through the Trainer == the single-process run
# ----------------------------------------------------------------------------------------------------
def _lenet_victim() -> TensorBatchVictim:
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return TensorBatchVictim(model, images, torch.tensor([1, 7, 2, 7]), share_labels=True)


def _trainer_attack(**kwargs) -> ImagePriorAttack:
    return ImagePriorAttack(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5),
        label_strategy=SharedLabels(),
        distance=SquaredL2Distance(),
        priors=[TotalVariation(weight=1e-3)],
        seed=7,
        **kwargs,
    )


def _trainer(root: str, steps: int, **kwargs) -> pl.Trainer:
    from lightning_gi.callbacks import ReconstructionReport

    return pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, accelerator="cpu",
        callbacks=[ReconstructionReport(save_every_n_steps=3)], **kwargs,
    )


def _trainer_worker(rank: int, world: int, port: int, root: str, strategy: str, attack_kwargs: dict) -> None:
    _env(rank, world, port)
    from lightning_gi.cli import quiet_known_warnings

    quiet_known_warnings()
    attack = _trainer_attack(**attack_kwargs)
    if isinstance(strategy, dict):  # GIShardStrategy arguments instead of a registered name
        strategy = GIShardStrategy(**strategy)
    _trainer(root, 6, devices=world, strategy=strategy, num_nodes=1).fit(attack, _lenet_victim())
    torch.save({"local": attack.dummy_images.detach().clone(), "shard": (attack.shard.rank, attack.shard.world_size)},
               os.path.join(root, f"local{rank}.pt"))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_trainer_run_matches_single_process(world, tmp_path):
    _spawn(_trainer_worker, world, str(tmp_path / "sharded"), "gi_shard", {})
    attack = _trainer_attack()
    _trainer(str(tmp_path / "single"), 6, devices=1).fit(attack, _lenet_victim())
    single = torch.load(tmp_path / "single" / "reconstruction.pt", weights_only=True)
    sharded = torch.load(tmp_path / "sharded" / "reconstruction.pt", weights_only=True)
    assert sharded["images"].shape == single["images"].shape == (4, 3, 16, 16)
    assert sharded["labels"].tolist() == single["labels"].tolist() == [1, 7, 2, 7]
    torch.testing.assert_close(sharded["images"], single["images"], rtol=0, atol=2e-6)
    assert sharded["matching_distance"] == pytest.approx(single["matching_distance"], rel=1e-5)
    # each rank optimised only its own shard: its final dummies are the slice of the single-process ones
    for rank in range(world):
        local = torch.load(tmp_path / "sharded" / f"local{rank}.pt", weights_only=True)["local"]
        start, stop = split_range(4, world, rank)
        torch.testing.assert_close(local, attack.dummy_images.detach()[:, start:stop], rtol=0, atol=2e-6)


def test_restarts_over_ranks_pick_the_single_process_winner(tmp_path):
    world = 2
    _spawn(_trainer_worker, world, str(tmp_path / "ranks"), "gi_restarts", {"restarts": 4})
    attack = _trainer_attack(restarts=4)
    _trainer(str(tmp_path / "single"), 6, devices=1).fit(attack, _lenet_victim())
    single = torch.load(tmp_path / "single" / "reconstruction.pt", weights_only=True)
    ranks = torch.load(tmp_path / "ranks" / "reconstruction.pt", weights_only=True)
    assert ranks["best_restart"] == single["best_restart"]
    assert ranks["restart_losses"] == pytest.approx(single["restart_losses"], rel=1e-5)
    torch.testing.assert_close(ranks["images"], single["images"], rtol=0, atol=2e-6)
    assert ranks["restart_images"].shape == single["restart_images"].shape == (4, 4, 3, 16, 16)
    # rank 1 held restarts 2 and 3 only
    local = torch.load(tmp_path / "ranks" / "local1.pt", weights_only=True)["local"]
    torch.testing.assert_close(local, attack.dummy_images.detach()[2:4], rtol=0, atol=2e-6)


def test_restart_groups_times_batch_shards(tmp_path):
    """4 ranks = 2 restart groups x 2 batch shards (collectives on each group's own process group)."""
    _spawn(_trainer_worker, 4, str(tmp_path / "hybrid"), {"restart_groups": 2}, {"restarts": 3})
    attack = _trainer_attack(restarts=3)
    _trainer(str(tmp_path / "single"), 6, devices=1).fit(attack, _lenet_victim())
    single = torch.load(tmp_path / "single" / "reconstruction.pt", weights_only=True)
    hybrid = torch.load(tmp_path / "hybrid" / "reconstruction.pt", weights_only=True)
    assert hybrid["best_restart"] == single["best_restart"]
    assert hybrid["restart_losses"] == pytest.approx(single["restart_losses"], rel=1e-5)
    torch.testing.assert_close(hybrid["images"], single["images"], rtol=0, atol=2e-6)
    torch.testing.assert_close(hybrid["restart_images"], single["restart_images"], rtol=0, atol=2e-6)
    # rank 3 = group 1 (restart 2), batch shard 1 (images 2..3)
    local = torch.load(tmp_path / "hybrid" / "local3.pt", weights_only=True)["local"]
    torch.testing.assert_close(local, attack.dummy_images.detach()[2:3, 2:4], rtol=0, atol=2e-6)


def _idlg_worker(rank: int, world: int, port: int, root: str, strategy: str, batch: int = 1) -> None:
    from lightning_gi.attacks import IDLG

    _env(rank, world, port)
    attack = IDLG(seed=0)  # L-BFGS
    victim = _lenet_victim()
    victim.images, victim.labels = victim.images[:batch], victim.labels[:batch]
    _trainer(root, 3, devices=world, strategy=strategy, num_nodes=1).fit(attack, victim)


def test_idlg_lbfgs_over_ranks_and_refused_when_sharded(tmp_path):
    from lightning_gi.attacks import IDLG

    _spawn(_idlg_worker, 2, str(tmp_path / "ranks"), "gi_restarts")
    ranks = torch.load(tmp_path / "ranks" / "reconstruction.pt", weights_only=True)
    singles = []
    for seed in (0, 1):  # rank j runs the attack with seed + j
        victim = _lenet_victim()
        victim.images, victim.labels = victim.images[:1], victim.labels[:1]
        attack = IDLG(seed=seed)
        _trainer(str(tmp_path / f"s{seed}"), 3, devices=1).fit(attack, victim)
        singles.append(torch.load(tmp_path / f"s{seed}" / "reconstruction.pt", weights_only=True)["matching_distance"])
    assert ranks["group_losses"] == pytest.approx(singles, rel=1e-5)
    assert ranks["matching_distance"] == pytest.approx(min(singles), rel=1e-5)
    with pytest.raises(Exception, match="L-BFGS cannot run batch-sharded"):
        _spawn(_idlg_worker, 2, str(tmp_path / "sharded"), "gi_shard", 2)


# ----------------------------------------------------------------------------------------------------
# 3. single-process checks of the strategy and of vectorised restarts
# ----------------------------------------------------------------------------------------------------
def test_strategies_registered_and_do_not_wrap():
    from pytorch_lightning.strategies import StrategyRegistry

    for name in ("gi_shard", "gi_restarts", "gi_shard_spawn"):
        assert name in StrategyRegistry
    strategy = StrategyRegistry.get("gi_restarts")
    assert isinstance(strategy, GIShardStrategy) and strategy.restart_groups == -1
    assert GIShardStrategy.configure_ddp is not pl.strategies.DDPStrategy.configure_ddp


def test_shard_geometry():
    assert [split_range(5, 2, k) for k in range(2)] == [(0, 3), (3, 5)]
    assert [split_range(5, 4, k) for k in range(4)] == [(0, 2), (2, 3), (3, 4), (4, 5)]
    s = Shard(rank=5, world_size=8, restart_groups=2)
    assert (s.batch_world, s.batch_rank, s.restart_rank) == (4, 1, 1)
    assert s.restart_range(6) == (3, 6) and s.batch_slice(8) == slice(2, 4)
    with pytest.raises(ValueError):
        Shard(rank=0, world_size=4, restart_groups=3)


def _vector_pair(restarts=3, priors=None, dtype=torch.float64):
    inputs = _bn_inputs(dtype)
    attacks = []
    for cls in (ImagePriorAttack, VectorisedRestartsAttack):
        a = cls(
            optimizer=lambda p: torch.optim.Adam(p, lr=0.05), label_strategy=SharedLabels(), distance=CosineDistance(),
            priors=priors if priors is not None else [TotalVariation(weight=1e-2), L2ImageNorm(weight=1e-3)],
            restarts=restarts, seed=11, boxed=True,
        )
        attacks.append(a.bind(inputs).to(dtype))
    return attacks


def test_vectorised_restarts_equal_sequential_restarts():
    sequential, vectorised = _vector_pair()
    opts = [torch.optim.Adam(a._unknowns, lr=0.05) for a in (sequential, vectorised)]
    for _ in range(5):
        outs = []
        for a, opt in zip((sequential, vectorised), opts):
            opt.zero_grad()
            loss, distances, images, terms = a.evaluate()
            a.update_best(distances.detach(), images.detach())
            a.backward(loss)
            opt.step()
            a.project()
            outs.append((loss.detach(), distances.detach()))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(vectorised.dummy_images, sequential.dummy_images, rtol=0, atol=1e-10)
    for a in (sequential, vectorised):
        a.evaluate_final_iterate()
    torch.testing.assert_close(vectorised.best_loss, sequential.best_loss, rtol=1e-10, atol=1e-12)
    rec_s, rec_v = sequential.reconstruction(), vectorised.reconstruction()
    assert rec_v["best_restart"] == rec_s["best_restart"]
    torch.testing.assert_close(rec_v["images"], rec_s["images"], rtol=0, atol=1e-10)


def test_vectorised_restarts_through_the_trainer(lean_trainer_kwargs):
    victim = _lenet_victim()
    runs = []
    for cls in (ImagePriorAttack, VectorisedRestartsAttack):
        a = cls(optimizer=lambda p: torch.optim.SGD(p, lr=0.05), label_strategy=SharedLabels(), restarts=3, seed=2)
        pl.Trainer(max_steps=4, **lean_trainer_kwargs).fit(a, victim)
        runs.append(a.reconstruction())
    assert runs[0]["best_restart"] == runs[1]["best_restart"]
    assert runs[1]["restart_losses"] == pytest.approx(runs[0]["restart_losses"], rel=1e-4)
    torch.testing.assert_close(runs[1]["images"], runs[0]["images"], rtol=0, atol=1e-5)


def test_vectorised_restarts_refuse_the_bn_prior():
    with pytest.raises(ValueError, match="BNStatisticsPrior"):
        _vector_pair(priors=[BNStatisticsPrior(weight=0.1)])


def test_batch_sharding_refuses_train_mode_bn():
    inputs = _bn_inputs()
    inputs.model.train()
    attack = ImagePriorAttack(label_strategy=SharedLabels())
    attack.shard = Shard(rank=0, world_size=2)
    with pytest.raises(ValueError, match="train mode"):
        attack.bind(inputs)
