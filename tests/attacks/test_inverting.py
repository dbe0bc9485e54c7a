"""Inverting Gradients, the generic image-prior attack, GradInversion recipe: update rules, restarts, configs."""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_gi.attacks import GradInversion, ImagePriorAttack, InvertingGradients
from lightning_gi.attacks.image_prior import box_bounds, milestones_from_fractions
from lightning_gi.metrics import per_image_scores
from lightning_gi.objectives import BNStatisticsPrior, CosineDistance, TotalVariation
from lightning_gi.victim import TensorBatchVictim
from lightning_gi.attacks.update_rules import RawGradient, SignedGradient
from factories import photo_victim

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]


def lenet_victim(size: int = 16, batch_size: int = 1, seed: int = 0):
    return photo_victim(size, batch_size, seed, mean=CIFAR_MEAN, std=CIFAR_STD)


def fit(attack: pl.LightningModule, dm: pl.LightningDataModule, steps: int, kwargs: dict) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, **kwargs)
    trainer.fit(attack, datamodule=dm)
    return trainer


def psnr(images: torch.Tensor, truth: torch.Tensor) -> float:
    return float(per_image_scores(images, truth)["psnr"].mean())


# ---------------------------------------------------------------------------------------------------
# the attack works
# ---------------------------------------------------------------------------------------------------
def test_short_inverting_gradients_run_lowers_loss_and_raises_psnr(lean_trainer_kwargs):
    dm = lenet_victim(size=16)
    attack = InvertingGradients(priors=[TotalVariation(weight=1e-4)], seed=0)
    attack.bind(dm.attack_inputs())
    with torch.enable_grad():
        _, start_distance, start_images, _ = attack.evaluate()
    start_rgb = attack.inputs.to_image_space(start_images[0].detach()).clamp(0, 1)
    truth = dm.ground_truth().images
    fit(attack, dm, 150, lean_trainer_kwargs)
    rec = attack.reconstruction()
    assert rec["labels"].tolist() == dm.ground_truth().labels.tolist()
    assert rec["matching_distance"] < 0.5 * float(start_distance[0])
    start_psnr, end_psnr = psnr(start_rgb, truth), psnr(rec["images"], truth)
    assert end_psnr > start_psnr + 5.0, (start_psnr, end_psnr)


def test_defaults_follow_the_paper():
    ig = InvertingGradients()
    assert isinstance(ig.update_rule, SignedGradient) and ig.boxed
    assert ig.milestone_fractions == [3 / 8, 5 / 8, 7 / 8] and ig.lr_gamma == 0.1
    assert isinstance(ig.distance, CosineDistance) and not ig.distance.per_layer
    assert [type(p) for p in ig.priors] == [TotalVariation]
    assert len(InvertingGradients(priors=[]).priors) == 0
    gi = GradInversion()
    assert [type(p).__name__ for p in gi.priors] == ["BNStatisticsPrior", "TotalVariation", "L2ImageNorm"]
    with pytest.raises(ValueError):
        ImagePriorAttack(restarts=0)
    with pytest.raises(ValueError):
        ImagePriorAttack(milestone_fractions=[0.5, 0.25])
    with pytest.raises(TypeError):
        ImagePriorAttack(priors=[nn.Identity()])  # no weight


# ---------------------------------------------------------------------------------------------------
# update rules
# ---------------------------------------------------------------------------------------------------
def test_signed_gradient_moves_every_pixel_by_exactly_the_step(lean_trainer_kwargs):
    dm = lenet_victim(size=8)
    lr = 0.05
    attack = ImagePriorAttack(optimizer=partial(torch.optim.SGD, lr=lr), update_rule=SignedGradient(), boxed=False)
    attack.bind(dm.attack_inputs())
    before = attack.dummy_images.detach().clone()
    fit(attack, dm, 1, lean_trainer_kwargs)
    step = (attack.dummy_images.detach() - before).abs()
    assert torch.allclose(step, torch.full_like(step, lr), atol=1e-6)
    # unsigned: the plain (tiny) gradient step
    plain = ImagePriorAttack(optimizer=partial(torch.optim.SGD, lr=lr), update_rule=RawGradient())
    plain.bind(dm.attack_inputs())
    before = plain.dummy_images.detach().clone()
    fit(plain, dm, 1, lean_trainer_kwargs)
    assert (plain.dummy_images.detach() - before).abs().max() < 0.5 * lr


def test_signed_adam_and_boxed_projection_keep_images_in_range(lean_trainer_kwargs):
    dm = lenet_victim(size=8)
    low, high = box_bounds(dm.mean, dm.std)
    # a large step makes the box bind on many pixels
    boxed = InvertingGradients(optimizer=partial(torch.optim.Adam, lr=1.0), restarts=2, seed=1)
    fit(boxed, dm, 5, lean_trainer_kwargs)
    x = boxed.dummy_images.detach()
    assert (x >= low - 1e-6).all() and (x <= high + 1e-6).all()
    on_bounds = torch.isclose(x, low.expand_as(x)) | torch.isclose(x, high.expand_as(x))
    assert on_bounds.float().mean() > 0.1  # the projection was active
    assert (boxed.restart_best_images >= low - 1e-6).all() and (boxed.restart_best_images <= high + 1e-6).all()
    # the same run without the box leaves the valid range
    free = InvertingGradients(optimizer=partial(torch.optim.Adam, lr=1.0), restarts=2, seed=1, boxed=False)
    fit(free, dm, 5, lean_trainer_kwargs)
    y = free.dummy_images.detach()
    assert ((y < low - 1e-3) | (y > high + 1e-3)).any()


def test_multistep_milestones_from_fractions(lean_trainer_kwargs):
    assert milestones_from_fractions([3 / 8, 5 / 8, 7 / 8], 24000) == [9000, 15000, 21000]
    with pytest.raises(ValueError):
        milestones_from_fractions([0.5], 0)
    with pytest.raises(ValueError):
        milestones_from_fractions([1.5], 100)
    dm = lenet_victim(size=8)
    attack = InvertingGradients(seed=0)
    trainer = fit(attack, dm, 16, lean_trainer_kwargs)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert sorted(scheduler.milestones) == [6, 10, 14]
    assert math.isclose(trainer.optimizers[0].param_groups[0]["lr"], 0.1 * 0.1**3, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------
# restarts
# ---------------------------------------------------------------------------------------------------
def test_restarts_are_reproducible_independent_and_the_lowest_loss_wins(lean_trainer_kwargs):
    dm = lenet_victim(size=8)
    runs = []
    for _ in range(2):
        attack = InvertingGradients(restarts=3, seed=5)
        fit(attack, dm, 20, lean_trainer_kwargs)
        runs.append(attack)
    a, b = runs
    assert torch.equal(a.dummy_images, b.dummy_images)
    assert torch.equal(a.restart_best_loss, b.restart_best_loss)
    # distinct initialisations
    assert not torch.allclose(a.restart_best_images[0], a.restart_best_images[1])
    # restarts do not interact: restart 0 follows the single-restart run with the same seed
    single = InvertingGradients(restarts=1, seed=5)
    fit(single, dm, 20, lean_trainer_kwargs)
    assert torch.allclose(single.dummy_images[0], a.dummy_images[0], atol=1e-5)
    assert math.isclose(float(single.restart_best_loss[0]), float(a.restart_best_loss[0]), rel_tol=1e-4)
    # the winner is the restart with the lowest kept matching distance
    rec = a.reconstruction()
    losses = rec["restart_losses"]
    assert rec["best_restart"] == min(range(3), key=losses.__getitem__)
    assert rec["matching_distance"] == min(losses)
    assert torch.equal(rec["images"], rec["restart_images"][rec["best_restart"]])
    assert math.isclose(float(a.best_loss), min(losses), rel_tol=1e-6)


def test_winner_selection_uses_each_restarts_best_iterate():
    dm = lenet_victim(size=8)
    attack = InvertingGradients(restarts=3, seed=0)
    attack.bind(dm.attack_inputs())
    imgs = attack.dummy_images.detach()
    attack.update_best(torch.tensor([0.5, 0.2, 0.9]), imgs)
    attack.update_best(torch.tensor([0.4, 0.3, float("nan")]), imgs + 1.0)  # restart 1 got worse, 2 NaN
    assert attack.restart_best_loss.tolist() == pytest.approx([0.4, 0.2, 0.9])
    assert torch.equal(attack.restart_best_images[1], imgs[1])  # best iterate kept, not the last
    assert torch.equal(attack.restart_best_images[0], imgs[0] + 1.0)
    assert attack.reconstruction()["best_restart"] == 1
    assert float(attack.best_loss) == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------------
# GradInversion-style recipe
# ---------------------------------------------------------------------------------------------------
class SmallBNNet(nn.Module):
    def __init__(self, classes: int = 14) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.fc = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def test_gradinversion_batch_recovers_labels_and_lowers_the_loss(lean_trainer_kwargs):
    torch.manual_seed(0)
    from lightning_gi.victim.data import BundledPhotographs

    data = BundledPhotographs(image_size=8)
    idx = [0, 8 * 3, 8 * 7]  # three photographs, three distinct labels
    images = torch.stack([data[i][0] for i in idx])
    labels = torch.tensor([data[i][1] for i in idx])
    dm = TensorBatchVictim(SmallBNNet().eval(), images, labels, mean=CIFAR_MEAN, std=CIFAR_STD)
    attack = GradInversion(seed=0)
    attack.bind(dm.attack_inputs())
    assert sorted(attack.labels.tolist()) == sorted(labels.tolist())
    assert isinstance(attack.priors[0], BNStatisticsPrior) and attack.priors[0].attached
    with torch.enable_grad():
        start_loss = float(attack.evaluate()[0])
    fit(attack, dm, 60, lean_trainer_kwargs)
    with torch.enable_grad():
        end_loss = float(attack.evaluate()[0])
    assert end_loss < 0.5 * start_loss
    rec = attack.reconstruction()
    assert rec["images"].shape == images.shape


# ---------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------
NEW_CONFIGS = [
    "inverting_gradients_demo.yaml",
    "inverting_gradients_cifar.yaml",
    "inverting_gradients_imagenet.yaml",
    "gradinversion_demo.yaml",
]


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_config_parses_through_the_cli(name, capsys):
    from lightning_gi.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_gi.attacks." in printed


@pytest.mark.parametrize("name", ["inverting_gradients_demo.yaml", "gradinversion_demo.yaml"])
def test_demo_config_runs_a_few_steps(name, tmp_path):
    from lightning_gi.cli import run

    cli = run(
        [
            "fit",
            "--config", str(CONFIGS / name),
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 2
    assert (Path(cli.trainer.log_dir) / "reconstruction.pt").is_file()


def test_default_labels_are_auto_and_count_duplicates():
    """Issue 12: with no label strategy, IG/GradInversion use AutoLabels (iLRG counts for a biased head), which
    gets a batch with duplicated labels right where the iDLG rule (distinct labels only) cannot."""
    import torch

    from lightning_gi.attacks import GradInversion, InvertingGradients
    from lightning_gi.labels import AutoLabels
    from lightning_gi.victim import ConvNet, TensorBatchVictim

    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    labels = torch.tensor([1, 1, 1, 4, 4, 7])
    dm = TensorBatchVictim(ConvNet(num_classes=10, width=8, image_size=16, norm="batch").eval(), images, labels)
    dm.setup("fit")
    for attack in (InvertingGradients(), GradInversion()):
        attack.bind(dm.attack_inputs())
        assert isinstance(attack.label_strategy, AutoLabels)
        assert attack.label_strategy.diagnostics["chosen_strategy"] == "ilrg"
        assert sorted(attack.labels.tolist()) == labels.tolist()


# ---------------------------------------------------------------------------------------------------
# named recipes: ImagePriorAttack with other defaults, through the config parser
# ---------------------------------------------------------------------------------------------------
def _from_config(class_path: str, **init_args):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ImagePriorAttack, "model")
    cfg = parser.parse_object({"model": {"class_path": class_path, "init_args": init_args}})
    assert set(vars(cfg.model.init_args)) >= {"update_rule", "boxed", "milestone_fractions", "restart_mode", "priors"}
    return parser.instantiate_classes(cfg).model


def test_recipes_take_their_defaults_through_the_parser_and_explicit_values_win():
    from lightning_gi.attacks import WDLG
    from lightning_gi.objectives import SquaredL2Distance, WassersteinDistance

    ig = _from_config("lightning_gi.attacks.InvertingGradients", restarts=2)
    assert isinstance(ig.update_rule, SignedGradient) and ig.boxed and ig.restarts == 2
    assert ig.milestone_fractions == pytest.approx([0.375, 0.625, 0.875])
    assert isinstance(ig.distance, CosineDistance) and [type(p).__name__ for p in ig.priors] == ["TotalVariation"]
    plain = _from_config("lightning_gi.attacks.InvertingGradients", update_rule={"class_path": "lightning_gi.attacks.update_rules.RawGradient"}, milestone_fractions=[], priors=[])
    assert isinstance(plain.update_rule, RawGradient) and plain.milestone_fractions is None and len(plain.priors) == 0
    gi = _from_config("lightning_gi.attacks.GradInversion")
    assert isinstance(gi.distance, SquaredL2Distance) and isinstance(gi.update_rule, RawGradient) and not gi.boxed
    assert [type(p).__name__ for p in gi.priors] == ["BNStatisticsPrior", "TotalVariation", "L2ImageNorm"]
    wdlg = _from_config("lightning_gi.attacks.WDLG")
    assert isinstance(wdlg, WDLG) and isinstance(wdlg.distance, WassersteinDistance) and len(wdlg.priors) == 0
    generic = _from_config("lightning_gi.attacks.ImagePriorAttack")
    assert isinstance(generic.update_rule, RawGradient) and generic.milestone_fractions is None
    assert InvertingGradients().priors[0] is not InvertingGradients().priors[0]  # a fresh prior per attack


def test_update_rules_are_pluggable_objects():
    """lightning_gi.attacks.update_rules: the direction fed to the optimiser, with an optional warm-up factor."""
    from lightning_gi.attacks.update_rules import QuantisedSign

    g = torch.tensor([[[-3.0, 0.0, 0.5, 2.0]], [[1.0, -1.0, 4.0, 0.1]]])  # two restarts
    assert torch.equal(SignedGradient()(g, step=0), torch.sign(g))
    assert torch.equal(RawGradient()(g, step=0), g)
    q = QuantisedSign(warmup_steps=2, warmup_factor=2.0)
    early, late = q(g, step=1), q(g, step=2)
    torch.testing.assert_close(early, 2 * late)
    assert {round(v, 4) for v in late.abs().flatten().tolist()} <= {0.0, 0.2, 0.6, 1.0}  # 0.8 * {0, 0.5, 1} + 0.2 * |sign|
    with pytest.raises(ValueError, match="warmup_factor must be > 0"):
        SignedGradient(warmup_steps=1, warmup_factor=0.0)
    with pytest.raises(TypeError, match="update_rule must be an UpdateRule"):
        ImagePriorAttack(update_rule="sign")
