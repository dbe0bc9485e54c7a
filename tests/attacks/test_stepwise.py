"""The stepwise attack's update rule, truncation, LR decay and callbacks, through the Trainer."""
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_gi.attacks import StepwiseInversion
from lightning_gi.attacks.stepwise import paper_callbacks, quantized_sign
from lightning_gi.attacks.update_rules import QuantisedSign
from lightning_gi.callbacks import GradientDropout, PriorSchedule, StepwiseGradientSchedule
from lightning_gi.labels import AutoLabels, EvolutionaryLabelCounts, SharedLabels
from lightning_gi.objectives import BNStatisticsPrior, cosine_distance
from lightning_gi.victim import TensorBatchVictim


def test_quantized_sign_values():
    g = torch.tensor([0.0, 0.1, -0.2, 0.3, 1.0, -4.0, 0.5, 0.6])
    med = g.abs().median()  # 0.3 (lower median of 8 values)
    q = torch.clamp(torch.round(g / med * 2) / 2, -1, 1)
    expected = 0.8 * q + 0.2 * torch.sign(g)
    assert torch.allclose(quantized_sign(g), expected)
    out = quantized_sign(g)
    assert out[0] == 0 and out[4] == pytest.approx(1.0) and out[5] == pytest.approx(-1.0)
    assert out[1] == pytest.approx(0.8 * 0.5 + 0.2)  # 0.1/0.3*2 = 0.67 -> 1 -> 0.5
    # per restart: each slice normalised by its own median
    two = torch.stack([g, 100 * g])
    assert torch.allclose(quantized_sign(two, per_first_dim=True), torch.stack([out, out]))
    # all-zero median -> plain sign
    z = torch.tensor([0.0, 0.0, 0.0, 2.0])
    assert torch.equal(quantized_sign(z), torch.sign(z))


def small_case(n=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 10)).eval()
    images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return TensorBatchVictim(model, images, torch.tensor([1, 4][:n]), share_labels=True,
                             mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


class UpdateProbe(pl.Callback):
    def __init__(self):
        self.grads, self.lrs, self.ranges = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # the LR of this step (the transformed gradient is read after the step, in on_train_batch_end)
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.grads.append(pl_module.dummy_images.grad.detach().clone())
        x = pl_module.inputs.to_image_space(pl_module.dummy_images.detach())
        self.ranges.append((float(x.min()), float(x.max())))


def test_update_rule_truncation_and_lr_decay_through_trainer(lean_trainer_kwargs):
    attack = StepwiseInversion(label_strategy=SharedLabels(), update_rule=QuantisedSign(warmup_steps=3, warmup_factor=2.0), priors=[])
    probe = UpdateProbe()
    trainer = pl.Trainer(max_steps=16, callbacks=[probe], **lean_trainer_kwargs)
    trainer.fit(attack, datamodule=small_case())
    # the optimiser saw the quantised sign, doubled during the warm-up
    values = torch.cat([g.flatten() for g in probe.grads[:3]]).abs().unique()
    assert set(round(float(v), 4) for v in values) <= {0.0, 0.4, 1.2, 2.0}
    later = torch.cat([g.flatten() for g in probe.grads[3:]]).abs().unique()
    assert set(round(float(v), 4) for v in later) <= {0.0, 0.2, 0.6, 1.0}
    # truncation: the images stay in [0, 1]
    assert all(lo >= -1e-5 and hi <= 1 + 1e-5 for lo, hi in probe.ranges)
    # step decay gamma 0.33 at 37.5/62.5/87.5 % of 16 steps = steps 6, 10, 14
    assert probe.lrs[5] == pytest.approx(0.1) and probe.lrs[6] == pytest.approx(0.033)
    assert probe.lrs[10] == pytest.approx(0.1 * 0.33**2) and probe.lrs[14] == pytest.approx(0.1 * 0.33**3)


MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
TRUE_LABELS = [1, 4]


def easy_case():
    """A victim whose gradient pins the images down (a conv layer feeding a linear layer directly), 2 images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10)).eval()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    dm = TensorBatchVictim(model, images, torch.tensor(TRUE_LABELS), share_labels=True, mean=MEAN, std=STD)
    return dm, model, images


def unmasked_distance(model, images01, labels, target):
    """Cosine distance over ALL gradient tensors, no mask, computed from scratch (not through the attack)."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    loss = nn.functional.cross_entropy(model((images01 - mean) / std), labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(cosine_distance(list(grads), [t.detach() for t in target]))


def psnr(a, b):
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """The full recipe (default Stage I labels, the authors' three callbacks scaled to 150 steps) on the easy case."""
    cbs = paper_callbacks(total_steps=150, num_tensors=6)
    dm, model, images = easy_case()
    attack = StepwiseInversion()  # default: AutoLabels (iLRG for a biased head, else Stage I's evolutionary search)
    trainer = pl.Trainer(max_steps=150, callbacks=cbs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         default_root_dir=str(tmp_path_factory.mktemp("paper_run")))
    masks_at_last_step = []

    class LastMasks(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            masks_at_last_step[:] = [pl_module.gradient_masks]

    trainer.callbacks.append(LastMasks())
    trainer.fit(attack, datamodule=dm)
    start = attack.inputs.to_image_space(attack.initial_images(torch.Generator().manual_seed(attack.seed))).clamp(0, 1)
    return dict(attack=attack, cbs=cbs, model=model, images=images, start=start, last_masks=masks_at_last_step[0])


def test_paper_callbacks_and_default_label_strategy(paper_run):
    cbs, attack, model, images = paper_run["cbs"], paper_run["attack"], paper_run["model"], paper_run["images"]
    assert isinstance(cbs[0], StepwiseGradientSchedule) and cbs[0].every == 5
    assert isinstance(cbs[1], GradientDropout) and cbs[1].p == 0.3
    assert isinstance(cbs[2], PriorSchedule) and [s.step for s in cbs[2].switches] == [30, 50]
    assert [w for _, _, w in cbs[2].history] == [5e-3, 1e-4]
    assert isinstance(attack.label_strategy, AutoLabels) and attack.label_strategy.evolutionary.image_size == 8
    head_has_bias = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].bias is not None
    chosen = attack.label_strategy.diagnostics["chosen_strategy"]
    assert chosen == ("ilrg" if head_has_bias else "evolutionary"), chosen
    # Stage I: the labels are the truth on this easy case
    assert sorted(attack.labels.tolist()) == TRUE_LABELS
    rec = attack.reconstruction()
    assert rec["images"].shape == (2, 3, 8, 8)
    # Stage II: the matching distance falls by more than 20x and the images are far closer than the random start
    target = attack.observation.gradients
    labels = torch.tensor(TRUE_LABELS)
    start_distance = unmasked_distance(model, paper_run["start"], labels, target)
    assert rec["matching_distance"] < start_distance / 20
    start_psnr = psnr(paper_run["start"], images)
    order = [int((rec["images"] - img).pow(2).flatten(1).mean(1).argmin()) for img in images]  # pair each true image
    rec_psnr = min(psnr(rec["images"][j], images[i]) for i, j in enumerate(order))
    assert sorted(order) == [0, 1] and rec_psnr > start_psnr + 8.0, (start_psnr, rec_psnr)


def test_reported_distance_is_the_unmasked_distance_of_the_output(paper_run):
    """Issue 11.3: with GradientDropout on until the last step (and the stepwise schedule matching only part of
    the tensors), the reported matching distance is the plain distance of the returned images: every tensor,
    no mask, computed here from scratch."""
    attack, model = paper_run["attack"], paper_run["model"]
    assert paper_run["last_masks"] is not None  # dropout was active at the last step
    assert attack.gradient_weights is not None and 0.0 in attack.gradient_weights  # the final stage skips tensors
    rec = attack.reconstruction()
    expected = unmasked_distance(model, rec["images"], attack.labels, attack.observation.gradients)
    assert rec["matching_distance"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert attack.gradient_masks is None  # cleared at the end as well


def test_return_iterate_last_returns_the_final_iterate(lean_trainer_kwargs):
    dm, model, _ = easy_case()
    attack = StepwiseInversion(label_strategy=SharedLabels(), return_iterate="last", milestone_fractions=None)
    trainer = pl.Trainer(max_steps=12, callbacks=paper_callbacks(total_steps=12, num_tensors=6), **lean_trainer_kwargs)
    trainer.fit(attack, datamodule=dm)
    rec = attack.reconstruction()
    final = attack.inputs.to_image_space(attack.dummy_images.detach()[0]).clamp(0, 1)
    assert torch.allclose(rec["images"], final, atol=1e-6)
    expected = unmasked_distance(model, rec["images"], attack.labels, attack.observation.gradients)
    assert rec["matching_distance"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="return_iterate"):
        StepwiseInversion(return_iterate="first")


def test_default_bn_prior_uses_the_authors_layer_weights():
    """BN prior layer weights of the authors' recipe: first BN x1.3, second BN x3, the others x1."""
    attack = StepwiseInversion(label_strategy=SharedLabels())
    bn_prior = [p for p in attack.priors if isinstance(p, BNStatisticsPrior)][0]
    assert (bn_prior.first_bn_multiplier, bn_prior.second_bn_multiplier, bn_prior.weight) == (1.3, 3.0, 1e-4)
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for c in (3, 4, 4)]
    model = nn.Sequential(*blocks).eval()
    for b in blocks:  # running statistics away from the defaults
        b[1].running_mean.uniform_(-1, 1)
        b[1].running_var.uniform_(0.5, 2)
    bn_prior.attach(model)
    x = torch.rand(2, 3, 6, 6)
    model(x)
    expected, h = 0.0, x
    for factor, block in zip([1.3, 3.0, 1.0], blocks):
        h = block[0](h)  # the BN layer's input
        bn = block[1]
        term = torch.linalg.vector_norm(h.mean(dim=(0, 2, 3)) - bn.running_mean)
        term = term + torch.linalg.vector_norm(h.var(dim=(0, 2, 3), unbiased=False) - bn.running_var)
        expected = expected + factor * term
        h = block[2](bn(h))
    assert float(bn_prior(x)) == pytest.approx(float(expected), rel=1e-5)


def test_configs_recipe_needs_checkpoint_and_demo_parses(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    from lightning_gi.cli import main

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, ValueError)) as err:  # jsonargparse wraps the MissingCheckpointError
        main(["fit", "--config", str(root / "configs/stepwise_resnet34_imagenet.yaml"), "--trainer.max_steps=1"])
    out = capsys.readouterr()
    text = out.out + out.err + str(err.value)
    assert "resnet34-b627a593.pth" in text and "checkpoints/README.md" in text
    with pytest.raises(SystemExit) as ok:
        main(["fit", "--config", str(root / "configs/stepwise_demo.yaml"), "--print_config"])
    assert ok.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "StepwiseInversion" in printed and "PriorSchedule" in printed and "GradientDropout" in printed
    assert "second_bn_multiplier: 3.0" in printed and "first_bn_multiplier: 1.3" in printed
