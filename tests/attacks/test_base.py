"""The restart-aware attack core and its contracts: the public matching objective, the shard protocol, the
strategies registered at package import."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lightning_gi.attacks import DLG, IDLG, ImagePriorAttack, VectorisedRestartsAttack
from lightning_gi.distributed import Shard, ShardableAttack
from lightning_gi.labels import SharedLabels
from lightning_gi.objectives import CosineDistance, TotalVariation
from lightning_gi.objectives.matching import MatchingObjective
from lightning_gi.victim import FedSGDVictim, LeNet


def _victim(batch_size: int = 2) -> FedSGDVictim:
    return FedSGDVictim(LeNet(num_classes=14, image_size=16), dataset="photographs", image_shape=(3, 16, 16),
                        batch_size=batch_size, batch_seed=0, model_seed=0, mean=[0.5] * 3, std=[0.25] * 3,
                        share_labels=True)


def _bound(restarts: int = 3, **kwargs) -> ImagePriorAttack:
    attack = ImagePriorAttack(label_strategy=SharedLabels(), distance=CosineDistance(), restarts=restarts, seed=1, **kwargs)
    return attack.bind(_victim().attack_inputs())


def test_objective_weights_and_masks_change_only_the_optimised_distance():
    attack = _bound(restarts=1)
    obj = attack.objective
    with torch.enable_grad():
        grads = [g.detach() for g in attack.victim_gradients(attack.restart_images()[0], attack.labels)]
    plain = float(obj.optimised(grads))
    obj.set_weights([0.0] * (obj.num_tensors - 1) + [1.0])
    obj.set_masks([torch.rand(t.shape) > 0.5 for t in obj.targets])
    assert obj.scheduled and attack.scheduled
    assert float(obj.optimised(grads)) != pytest.approx(plain)
    assert float(obj.score(grads)) == pytest.approx(plain)  # scoring ignores the schedule
    with obj.unscheduled():
        assert float(obj.optimised(grads)) == pytest.approx(plain)
    assert obj.scheduled  # restored
    obj.set_weights(None)
    obj.set_masks(None)
    assert float(obj.optimised(grads)) == pytest.approx(plain)


def test_objective_rejects_bad_weights_masks_and_prior_references():
    obj = _bound(restarts=1, priors=[TotalVariation(1e-3)]).objective
    with pytest.raises(ValueError, match="non-negative"):
        obj.set_weights([1.0])
    with pytest.raises(ValueError, match="non-negative"):
        obj.set_weights([-1.0] * obj.num_tensors)
    with pytest.raises(ValueError, match="masks"):
        obj.set_masks([None])
    with pytest.raises(ValueError, match="no prior of class"):
        obj.prior_index("BNStatisticsPrior")
    i = obj.prior_index("TotalVariation")
    obj.set_prior_weight(i, 0.5)
    assert obj.prior_weight(i) == 0.5


def test_reset_best_restarts_the_owners_tracking():
    attack = _bound(restarts=2)
    attack.update_best(torch.tensor([0.3, 0.1]), attack.restart_images().detach())
    assert float(attack.best_loss) == pytest.approx(0.1)
    attack.objective.reset_best()
    assert math.isinf(float(attack.best_loss)) and torch.isinf(attack.restart_best_loss).all()


def test_one_restart_loop_sums_restarts_and_scores_each():
    attack = _bound(restarts=3)
    with torch.enable_grad():
        total, distances, images, _ = attack.evaluate()
        alone = [attack.batch_objective(images[r], attack.labels)[0] for r in range(3)]
    assert distances.shape == (3,) and images.shape[:2] == (3, 2)
    assert float(total) == pytest.approx(float(sum(alone)), rel=1e-5)
    attack.evaluate_final_iterate()
    rec = attack.reconstruction()
    winner = int(torch.argmin(distances))
    assert rec["best_restart"] == winner and rec["restart_images"].shape[0] == 3
    assert rec["matching_distance"] == pytest.approx(min(rec["restart_losses"]))


def test_attacks_without_restart_dimension_use_the_same_core():
    attack = IDLG(label_strategy=SharedLabels()).bind(_victim().attack_inputs())
    assert attack.dummy_images.dim() == 4 and attack.restart_images().shape[0] == 1
    attack.evaluate_final_iterate()
    assert torch.equal(attack.best_images, attack.dummy_images.detach())
    dlg = DLG().bind(_victim().attack_inputs())
    with torch.enable_grad():
        _, targets = dlg.dummy_batch()
    assert targets.shape == (2, 14) and torch.allclose(targets.sum(-1), torch.ones(2))


def test_vectorised_restarts_are_an_option_of_the_core():
    seq = _bound(restarts=2, restart_mode="sequential")
    vec = _bound(restarts=2, restart_mode="vectorised")
    assert isinstance(VectorisedRestartsAttack(label_strategy=SharedLabels()), ImagePriorAttack)
    with torch.enable_grad():
        a, b = seq.evaluate(), vec.evaluate()
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-6)


def test_shard_uses_the_protocol_only():
    attack = _bound(restarts=4)
    assert isinstance(attack, ShardableAttack)
    full = attack.dummy_images.detach().clone()
    Shard(rank=1, world_size=2, restart_groups=2).localise_unknowns(attack)
    assert attack.restarts == 2 and attack.restart_span == (2, 4, 4)
    torch.testing.assert_close(attack.dummy_images.detach(), full[2:4])
    idlg = IDLG(label_strategy=SharedLabels(), seed=5).bind(_victim().attack_inputs())
    before = idlg.dummy_images.detach().clone()
    Shard(rank=1, world_size=2, restart_groups=2).localise_unknowns(idlg)
    expected = IDLG(label_strategy=SharedLabels(), seed=6).bind(_victim().attack_inputs()).dummy_images
    assert not torch.equal(idlg.dummy_images, before) and torch.equal(idlg.dummy_images, expected)


def test_strategies_registered_at_package_import_not_by_attacks():
    code = ("import sys, lightning_gi; assert 'torch' not in sys.modules; "
            "from pytorch_lightning.strategies import StrategyRegistry; "
            "assert all(n in StrategyRegistry for n in ('gi_shard', 'gi_restarts', 'gi_shard_spawn')); "
            "assert 'lightning_gi.attacks' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_matching_objective_standalone_prepared_cache_is_reused():
    targets = [torch.randn(3, 4), torch.randn(4)]
    obj = MatchingObjective(CosineDistance())
    obj.set_targets(targets)
    first = obj._prepared_distance()
    assert obj._prepared_distance() is first
    obj.set_weights([1.0, 0.0])
    assert obj._prepared_distance() is not first
