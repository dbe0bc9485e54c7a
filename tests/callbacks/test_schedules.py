"""Schedule callbacks observed through a real Trainer run (never by calling the callbacks by hand)."""
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_gi.attacks import ImagePriorAttack, InvertingGradients
from lightning_gi.callbacks import GradientDropout, PriorSchedule, PriorSwitch, StepwiseGradientSchedule
from lightning_gi.objectives import BNStatisticsPrior, CosineDistance, TotalVariation, cosine_distance
from lightning_gi.victim import TensorBatchVictim


def tiny_victim(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # tensors 0-3 (1-based 1-4)
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),  # tensors 4-7
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 5),  # tensors 8-9
    ).eval()


def victim_data(n: int = 2) -> TensorBatchVictim:
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 8, 8, generator=gen)
    return TensorBatchVictim(tiny_victim(), images, torch.arange(n) % 5)


class RecordingDistance:
    """The attack's distance, recording what the callbacks handed it and checking the mask is shared.

    Only the optimised evaluations are recorded (grad enabled); the attack also scores iterates with the same
    distance, unweighted and unmasked, under no_grad (those calls go to :attr:`scoring_calls`)."""

    def __init__(self) -> None:
        self.calls = []
        self.scoring_calls = []

    def __call__(self, dummy, target, weights=None, masks=None):
        value = cosine_distance(dummy, target, weights, masks)
        if not torch.is_grad_enabled():
            self.scoring_calls.append((weights, masks))
            return value
        if masks is not None:  # the same mask on both gradients: equals the cosine of the masked pair
            md = [g if m is None else g * m for g, m in zip(dummy, masks)]
            mt = [g if m is None else g * m for g, m in zip(target, masks)]
            assert torch.allclose(value, cosine_distance(md, mt, weights, None), atol=1e-6)
        self.calls.append((None if weights is None else list(weights), masks))
        return value


class Recorder(pl.Callback):
    """Listed last: sees what the schedules set for each optimiser step."""

    def __init__(self) -> None:
        self.steps, self.weights, self.masks, self.prior_weights = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)
        self.weights.append(None if pl_module.gradient_weights is None else list(pl_module.gradient_weights))
        self.masks.append(pl_module.gradient_masks)
        self.prior_weights.append([float(p.weight) for p in pl_module.priors])


def fit(attack, callbacks, steps, tmp_kwargs):
    rec = Recorder()
    trainer = pl.Trainer(max_steps=steps, callbacks=[*callbacks, rec], **tmp_kwargs)
    trainer.fit(attack, datamodule=victim_data())
    return rec


def test_stepwise_schedule_by_index_through_trainer(lean_trainer_kwargs):
    dist = RecordingDistance()
    attack = ImagePriorAttack(distance=dist, priors=[])
    sched = StepwiseGradientSchedule(start=9, stop=3, decrement=2, every=3)  # 1-based, 10 tensors
    rec = fit(attack, [sched], 12, lean_trainer_kwargs)
    assert rec.steps == list(range(12))
    first = {0: 8, 3: 6, 6: 4, 9: 2}  # 0-based first matched index: 9 -> 7 -> 5 -> 3 (1-based)
    for step, w in zip(rec.steps, rec.weights):
        start = first[max(k for k in first if k <= step)]
        assert w == [0.0] * start + [1.0] * (10 - start), step
    # the distance actually received those weights, one call per step (plus the final evaluation)
    assert [c[0] for c in dist.calls[:12]] == rec.weights
    assert [h[0] for h in sched.history] == [0, 3, 6, 9]


def test_stepwise_schedule_by_fraction_and_by_blocks(lean_trainer_kwargs):
    sched = StepwiseGradientSchedule(start=0.8, stop=0.0, decrement=0.4, every=2, unit="fraction")
    rec = fit(ImagePriorAttack(priors=[]), [sched], 6, lean_trainer_kwargs)
    starts = [w.index(1.0) for w in rec.weights]
    assert starts == [8, 8, 4, 4, 0, 0]

    blocks = StepwiseGradientSchedule(blocks=["8", "3", "0"], every=2)  # Sequential names: "8.weight", ...
    rec = fit(ImagePriorAttack(priors=[]), [blocks], 6, lean_trainer_kwargs)
    matched = [[i for i, v in enumerate(w) if v] for w in rec.weights]
    assert matched[0] == [8, 9] and matched[2] == [4, 5, 8, 9] and matched[4] == [0, 1, 4, 5, 8, 9]
    assert matched[1] == matched[0] and matched[5] == matched[4]


def test_schedule_change_restarts_best_iterate(lean_trainer_kwargs):
    class BestProbe(pl.Callback):
        def __init__(self):
            self.best = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.best.append(float(pl_module.restart_best_loss.min()) if hasattr(pl_module, "restart_best_loss")
                             else float(pl_module.best_loss))

    probe = BestProbe()
    sched = StepwiseGradientSchedule(start=9, stop=1, decrement=8, every=3)
    fit(ImagePriorAttack(priors=[]), [sched, probe], 5, lean_trainer_kwargs)
    assert probe.best[3] == float("inf") and probe.best[2] < float("inf")


def test_gradient_dropout_rate_fresh_masks_and_sharing(lean_trainer_kwargs):
    dist = RecordingDistance()  # asserts inside that the mask applies to both gradients
    attack = ImagePriorAttack(distance=dist, priors=[])
    sched = StepwiseGradientSchedule(start=5, stop=5, decrement=0, every=100)  # tensors 4..9 matched
    drop = GradientDropout(p=0.3, seed=0)
    rec = fit(attack, [sched, drop], 6, lean_trainer_kwargs)
    kept = total = 0
    for masks, weights in zip(rec.masks, rec.weights):
        assert [m is None for m in masks] == [w == 0.0 for w in weights]  # masks only on matched tensors
        for m in masks:
            if m is not None:
                kept += int(m.sum())
                total += m.numel()
    assert total > 2000 and abs(kept / total - 0.7) < 0.04
    # fresh every step
    assert not torch.equal(rec.masks[0][4], rec.masks[1][4])
    # the distance received exactly those masks
    assert all(c[1] is m for c, m in zip(dist.calls, rec.masks))


def unmasked_distance(attack, images):
    """Cosine distance over every tensor, no mask, of ``images`` (input space), computed from scratch."""
    model = attack.victim
    loss = nn.functional.cross_entropy(model(images), attack.labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(cosine_distance(list(grads), [t.detach() for t in attack.observation.gradients]))


@pytest.mark.parametrize("with_stepwise", [False, True])
def test_best_iterate_and_reported_distance_ignore_masks_and_weights(lean_trainer_kwargs, with_stepwise):
    """Issue 11.3: under dropout until the last step (and a stepwise schedule), the kept iterate is the one with
    the lowest UNMASKED all-tensor distance among every iterate (the final one included) since the last stage
    change, and the reported matching distance is that distance of the returned images."""

    class Iterates(pl.Callback):
        def __init__(self):
            self.images = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in sched_changes:
                self.images.clear()  # the tracking restarts at a stage change
            self.images.append(pl_module.dummy_images.detach()[0].clone())

    sched_changes = {4} if with_stepwise else set()
    sched = [StepwiseGradientSchedule(start=9, stop=3, decrement=6, every=4)] if with_stepwise else []
    drop = GradientDropout(p=0.5, seed=0)
    probe = Iterates()
    attack = ImagePriorAttack(priors=[], boxed=True, init="rand")
    fit(attack, [*sched, drop, probe], 9, lean_trainer_kwargs)
    assert attack.gradient_masks is None
    probe.images.append(attack.dummy_images.detach()[0].clone())  # the final iterate
    scores = [unmasked_distance(attack, x) for x in probe.images]
    best = min(range(len(scores)), key=scores.__getitem__)
    rec = attack.reconstruction()
    assert rec["matching_distance"] == pytest.approx(scores[best], rel=1e-5, abs=1e-8)
    assert torch.allclose(rec["images"], attack.inputs.to_image_space(probe.images[best]).clamp(0, 1), atol=1e-6)
    returned = unmasked_distance(attack, attack.inputs.to_input_space(rec["images"]))
    assert rec["matching_distance"] == pytest.approx(returned, rel=1e-4, abs=1e-7)


def test_gradient_dropout_rate_on_a_large_tensor(lean_trainer_kwargs):
    # every tensor masked for 40 steps (about 19k draws): the keep rate is 0.7 within 1.5 points
    drop = GradientDropout(p=0.3, seed=1)
    with pytest.warns(UserWarning, match="before StepwiseGradientSchedule"):
        rec = fit(ImagePriorAttack(priors=[]), [drop, StepwiseGradientSchedule(start=9, stop=9, decrement=0)], 40,
                  lean_trainer_kwargs)
    masks = torch.cat([torch.cat([m.flatten().float() for m in step]) for step in rec.masks])
    assert all(all(m is not None for m in step) for step in rec.masks)  # wrong order: every tensor masked
    assert masks.numel() > 19000 and abs(float(masks.mean()) - 0.7) < 0.015


def test_prior_schedule_switches_weights_at_steps(lean_trainer_kwargs):
    tv, bn = TotalVariation(weight=123.0), BNStatisticsPrior(weight=7.0)
    calls = {"tv": [], "bn": []}
    attack = ImagePriorAttack(priors=[tv, bn])
    schedule = PriorSchedule([PriorSwitch("TotalVariation", 3, 5e-3), {"prior": 1, "step": 5, "weight": 1e-4}])

    class PriorCalls(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            calls["tv"].append(tv._called)
            calls["bn"].append(bn._called)
            tv._called = bn._called = False

    tv._called = bn._called = False
    tv.register_forward_hook(lambda *a: setattr(tv, "_called", True))
    bn.register_forward_hook(lambda *a: setattr(bn, "_called", True))
    rec = fit(attack, [schedule, PriorCalls()], 8, lean_trainer_kwargs)
    assert rec.prior_weights == [[0.0, 0.0]] * 3 + [[5e-3, 0.0]] * 2 + [[5e-3, 1e-4]] * 3
    # a prior with weight 0 is not even evaluated; once on, it enters the loss every step
    assert calls["tv"] == [False] * 3 + [True] * 5
    assert calls["bn"] == [False] * 5 + [True] * 3
    assert schedule.history == [(3, 0, 5e-3), (5, 1, 1e-4)]


def test_prior_schedule_errors(lean_trainer_kwargs):
    with pytest.raises(ValueError, match="no prior of class"):
        fit(ImagePriorAttack(priors=[TotalVariation()]), [PriorSchedule([PriorSwitch("BNStatisticsPrior", 1, 1.0)])],
            2, lean_trainer_kwargs)
    with pytest.raises(ValueError):
        PriorSchedule([])


def test_schedules_compose_with_inverting_gradients(lean_trainer_kwargs):
    """Generic: the same callbacks drive another attack (Inverting Gradients, 2 restarts)."""
    attack = InvertingGradients(restarts=2, priors=[TotalVariation(1e-2)])
    cbs = [StepwiseGradientSchedule(start=9, stop=1, decrement=4, every=2), GradientDropout(0.3),
           PriorSchedule([PriorSwitch("TotalVariation", 2, 1e-1)])]
    rec = fit(attack, cbs, 5, lean_trainer_kwargs)
    assert [w.index(1.0) for w in rec.weights] == [8, 8, 4, 4, 0]
    assert rec.prior_weights[1] == [0.0] and rec.prior_weights[2] == [0.1]
    assert torch.isfinite(attack.restart_best_loss).all()
