"""The stepwise attack's update rule, truncation, LR decay and callbacks, through the Trainer."""
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_gi.attacks import StepwiseInversion
from lightning_gi.attacks.stepwise import paper_callbacks, quantized_sign
from lightning_gi.callbacks import GradientDropout, PriorSchedule, StepwiseGradientSchedule
from lightning_gi.labels import EvolutionaryLabelCounts, SharedLabels
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
    attack = StepwiseInversion(label_strategy=SharedLabels(), warmup_steps=3, priors=[])
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


def test_paper_callbacks_and_default_label_strategy(lean_trainer_kwargs):
    cbs = paper_callbacks(total_steps=30, num_tensors=8)
    assert isinstance(cbs[0], StepwiseGradientSchedule) and cbs[0].every == 1
    assert isinstance(cbs[1], GradientDropout) and cbs[1].p == 0.3
    assert isinstance(cbs[2], PriorSchedule) and [s.step for s in cbs[2].switches] == [6, 10]
    attack = StepwiseInversion()  # default: EvolutionaryLabelCounts at the victim's geometry
    trainer = pl.Trainer(max_steps=12, callbacks=cbs, **lean_trainer_kwargs)
    trainer.fit(attack, datamodule=small_case())
    assert isinstance(attack.label_strategy, EvolutionaryLabelCounts)
    assert attack.label_strategy.image_size == 8
    assert attack.labels.numel() == 2
    assert [w for _, _, w in cbs[2].history] == [5e-3, 1e-4]
    rec = attack.reconstruction()
    assert rec["images"].shape == (2, 3, 8, 8) and rec["matching_distance"] < float("inf")
    assert attack.gradient_masks is None  # cleared at the end: outputs use unmasked gradients


def test_configs_recipe_needs_checkpoint_and_demo_parses(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    from lightning_gi.cli import main

    root = Path(__file__).resolve().parent.parent
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
