"""GIAS (latent then parameter search) and GIML (meta-learned generator) on tiny cases."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_gi.attacks import GIAS, GIML
from lightning_gi.checkpoints import MissingCheckpointError
from lightning_gi.generators import DCGANGenerator, StyleGAN2Generator, create_generator
from lightning_gi.labels import SharedLabels
from lightning_gi.victim import GradientTasks, TensorBatchVictim
from lightning_gi.victim.models import LeNet

ROOT = Path(__file__).resolve().parents[2]


def tiny_dcgan(seed: int = 0) -> DCGANGenerator:
    torch.manual_seed(seed)
    g = DCGANGenerator(32, z_dim=8, ngf=4).eval()
    with torch.no_grad():  # DCGAN's N(0, 0.02) init gives nearly constant grey images: make them varied
        for m in g.modules():
            if isinstance(m, torch.nn.ConvTranspose2d):
                m.weight.normal_(0.0, 0.2)
    return g


def victim_batch(gen: torch.nn.Module, n: int = 2, seed: int = 1, size: int = 32) -> TensorBatchVictim:
    """Private images the generator can express (its own samples), on a small LeNet."""
    torch.manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n, gen.z_dim)
        x = (gen(z) + 1) / 2
        if x.shape[-1] != size:
            x = torch.nn.functional.adaptive_avg_pool2d(x, size)
    model = LeNet(num_classes=4, image_size=size)
    return TensorBatchVictim(model, x, torch.arange(n) % 4, share_labels=True)


def fit(attack, dm, lean_trainer_kwargs, max_steps=-1):
    trainer = pl.Trainer(max_steps=max_steps, **lean_trainer_kwargs)
    trainer.fit(attack, datamodule=dm)
    return trainer


def test_gias_dcgan_tiny_lowers_loss_and_switches_phase(lean_trainer_kwargs):
    gen = tiny_dcgan()
    dm = victim_batch(gen)
    attack = GIAS(generator=gen, latent_steps=15, param_steps=10, restarts=2, latent_lr=0.05, param_lr=1e-3, label_strategy=SharedLabels(), seed=3)
    dm.setup()
    attack.bind(dm.attack_inputs())
    with torch.enable_grad():
        _, d0, _, _ = attack.evaluate()
    initial = float(d0.detach().min())
    base_before = {k: v.clone() for k, v in gen.state_dict().items()}
    copies_before = [p.clone() for p in attack.synthesis_copies.parameters()]

    trainer = fit(attack, dm, lean_trainer_kwargs)
    assert attack.step_count == 25 and attack.phase == "parameter" and trainer.global_step == 25
    rec = attack.reconstruction()
    assert rec["images"].shape == (2, 3, 32, 32) and rec["latent_phase_images"].shape == (2, 3, 32, 32)
    assert len(rec["restart_losses"]) == 2
    assert rec["latent_phase_matching_distance"] < initial
    # the shared generator is frozen, the per-image copies were trained, the latents were fixed in phase 2
    for k, v in gen.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(copies_before, attack.synthesis_copies.parameters()))
    assert len(attack.synthesis_copies) == 2
    assert not attack.latents.requires_grad


def _final_distance(attack: GIAS, images: torch.Tensor) -> float:
    with torch.enable_grad():
        return float(attack.matching_distance([g.detach() for g in attack.victim_gradients(images, attack.labels)]))


def test_gias_best_latent_iterate_is_consistent(lean_trainer_kwargs):
    """Item 4: the stored best latent regenerates exactly the stored best image (and its distance), and the
    parameter phase starts from exactly that image. A large constant lr makes the latent search oscillate,
    so its best iterate is not the last one (the case where the old code paired the post-step latent with
    the pre-step image)."""
    gen = tiny_dcgan()
    dm = victim_batch(gen)
    attack = GIAS(generator=gen, latent_steps=10, param_steps=2, latent_lr=2.0, milestone_fractions=None, restarts=1, label_strategy=SharedLabels(), seed=3)
    fit(attack, dm, lean_trainer_kwargs)
    lead = attack.leading_restart()
    with torch.no_grad():
        last_latent_image = attack.latent_images(attack.latents[lead].unsqueeze(0))[0]  # latents frozen at the switch
        regenerated = attack.latent_images(attack.best_latents[lead].unsqueeze(0))[0]
        phase2_start = attack.output_map(attack.generator.synthesis_network()(attack.fixed_input))
    assert (last_latent_image - attack.latent_phase_images).abs().max() > 1e-3  # the best is not the last iterate
    assert torch.allclose(regenerated, attack.latent_phase_images, atol=1e-5)
    assert torch.allclose(phase2_start, attack.latent_phase_images, atol=1e-5)
    assert _final_distance(attack, regenerated) == pytest.approx(float(attack.latent_phase_best_loss), rel=1e-4, abs=1e-7)


def test_gias_best_parameter_iterate_is_consistent(lean_trainer_kwargs):
    """Item 4, parameter phase: the kept synthesis copies regenerate the reported best images and distance."""
    gen = tiny_dcgan()
    dm = victim_batch(tiny_dcgan(5), seed=2)
    attack = GIAS(generator=gen, latent_steps=4, param_steps=8, param_lr=0.05, milestone_fractions=None, label_strategy=SharedLabels(), seed=3)
    fit(attack, dm, lean_trainer_kwargs)
    copies = attack.best_synthesis_copies()
    with torch.no_grad():
        best = attack.output_map(torch.cat([net(attack.fixed_input[i : i + 1]) for i, net in enumerate(copies)]))
    assert torch.allclose(best, attack.best_images, atol=1e-5)
    assert _final_distance(attack, best) == pytest.approx(float(attack.best_loss), rel=1e-4, abs=1e-7)


def test_gias_parameter_phase_improves_on_latent_phase(lean_trainer_kwargs):
    """The parameter phase's LAST iterate matches the gradient better than the latent phase's best, and the
    reported images are closer to the private ones (PSNR), for images outside the generator's range."""
    from lightning_gi.metrics import reconstruction_metrics

    dm = victim_batch(tiny_dcgan(5), seed=2)  # private images from another generator
    attack = GIAS(generator=tiny_dcgan(), latent_steps=20, param_steps=40, latent_lr=0.05, param_lr=1e-2, label_strategy=SharedLabels(), seed=3)
    fit(attack, dm, lean_trainer_kwargs)
    rec = attack.reconstruction()
    with torch.no_grad():
        final_images = attack.parameter_images()
    assert _final_distance(attack, final_images) < 0.5 * rec["latent_phase_matching_distance"]
    gt = dm.ground_truth().images
    psnr_latent = float(reconstruction_metrics(rec["latent_phase_images"], gt)["psnr"])
    psnr_final = float(reconstruction_metrics(rec["images"], gt)["psnr"])
    assert psnr_final > psnr_latent + 0.5


def test_gias_latent_only_and_stylegan2_wplus_pooled(lean_trainer_kwargs):
    torch.manual_seed(0)
    sg = StyleGAN2Generator(z_dim=8, w_dim=8, img_resolution=16, mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=64, channel_max=8)).eval()
    dm = victim_batch(sg, n=2, size=8)  # 16x16 generator output average-pooled to the 8x8 victim
    attack = GIAS(generator=sg, latent_space="w+", latent_steps=4, param_steps=3, restarts=1, label_strategy=SharedLabels())
    fit(attack, dm, lean_trainer_kwargs)
    assert attack.latents.shape == (1, 2, sg.num_ws, 8)
    assert attack.fixed_input.shape == (2, sg.num_ws, 8)
    assert attack.reconstruction()["images"].shape == (2, 3, 8, 8)
    gen = tiny_dcgan()
    only = GIAS(generator=gen, latent_steps=5, param_steps=0, label_strategy=SharedLabels())
    fit(only, victim_batch(gen), lean_trainer_kwargs)
    assert only.step_count == 5 and only.phase == "latent" and len(only.synthesis_copies) == 0
    assert only.reconstruction()["matching_distance"] == pytest.approx(only.reconstruction()["latent_phase_matching_distance"])
    with pytest.raises(ValueError, match="latent spaces"):
        GIAS(generator=gen, latent_space="w").bind(victim_batch(gen).attack_inputs())


def test_gias_generator_from_registry_file(tmp_path, lean_trainer_kwargs):
    from lightning_gi.generators import save_generator

    path = save_generator(tiny_dcgan(), tmp_path / "g.pt")
    attack = GIAS(generator="dcgan_photos32", checkpoint_path=str(path), latent_steps=2, param_steps=2, label_strategy=SharedLabels())
    fit(attack, victim_batch(tiny_dcgan()), lean_trainer_kwargs)
    assert attack.generator.z_dim == 8
    missing = GIAS(generator="dcgan_photos32", checkpoint_path="no_such_generator_file.pt")
    with pytest.raises(MissingCheckpointError, match="no_such_generator_file.pt"):
        missing.prepare_data()
    with pytest.raises(MissingCheckpointError, match="no_such_generator_file.pt"):
        missing.bind(victim_batch(tiny_dcgan()).attack_inputs())


def test_imagenet_config_fails_clearly_without_generator(tmp_path, capsys):
    from lightning_gi.checkpoints import find_checkpoint
    from lightning_gi.cli import main

    if find_checkpoint("stylegan2_imagenet512.pkl") is not None:
        pytest.skip("a real stylegan2_imagenet512.pkl is installed in checkpoints/")
    # bundled photographs instead of ImageNet, so that only the generator file is missing; the CLI either
    # raises MissingCheckpointError or exits with a one-line error naming the file
    with pytest.raises((MissingCheckpointError, SystemExit)) as info:
        main(["fit", "--config", str(ROOT / "configs/gias_imagenet64_resnet18.yaml"), "--data.init_args.source.init_args.dataset", "photographs", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert "stylegan2_imagenet512.pkl" in str(info.value) + capsys.readouterr().err


def test_imagenet_config_pools_a_512px_generator_to_64px():
    """Item 7: the ImageNet recipe uses the authors' 512 px generator, average-pooled by 8 to the 64 px victim."""
    import yaml

    from lightning_gi.generators import pooling_factor
    from lightning_gi.generators import get_generator_config

    cfg = yaml.safe_load((ROOT / "configs/gias_imagenet64_resnet18.yaml").read_text())
    gen = get_generator_config(cfg["model"]["init_args"]["generator"])
    victim = cfg["data"]["init_args"]["image_shape"]
    assert gen.resolution == 512 and victim[1:] == [64, 64]
    assert pooling_factor(gen.resolution, victim[1]) == 8


def test_demo_config_parses():
    from lightning_gi.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs/gias_dcgan_demo.yaml"), "--print_config"])
    assert info.value.code in (0, None)


def test_giml_outer_update_moves_generator(tmp_path, lean_trainer_kwargs):
    dm = GradientTasks(LeNet(num_classes=14), image_shape=(3, 32, 32), batch_size=2, num_tasks=3)
    torch.manual_seed(0)
    giml = GIML("dcgan32", generator_kwargs=dict(z_dim=8, ngf=4), latent_steps=2, adapt_steps=3, generator_out=str(tmp_path / "giml.pt"))
    before = {k: v.clone() for k, v in giml.generator.named_parameters()}
    fit(giml, dm, lean_trainer_kwargs, max_steps=2)
    assert giml.meta_steps == 2
    moved = [k for k, v in giml.generator.named_parameters() if not torch.equal(v, before[k])]
    assert len(moved) == len(before)
    # the written generator is the meta-learned one and GIAS can load it
    loaded = create_generator("dcgan_giml32", checkpoint_path=str(tmp_path / "giml.pt"))
    z = torch.randn(2, 8)
    assert torch.equal(loaded(z), giml.generator.eval()(z))


def test_giml_meta_step_moves_towards_adapted_weights():
    torch.manual_seed(0)
    giml = GIML("dcgan32", generator_kwargs=dict(z_dim=8, ngf=4), latent_steps=1, adapt_steps=1, generator_out=None, meta_lr=1e-2)
    opt = torch.optim.Adam(giml.generator.parameters(), lr=1e-2)
    giml.optimizers = lambda: opt  # outside a Trainer
    adapted = DCGANGenerator(32, z_dim=8, ngf=4)
    old = [p.detach().clone() for p in giml.generator.parameters()]
    giml.meta_update(adapted)
    for p, o, q in zip(giml.generator.parameters(), old, adapted.parameters()):
        step, direction = (p.detach() - o).flatten(), (q.detach() - o).flatten()
        if direction.abs().max() == 0:  # e.g. BatchNorm biases: both at 0, nothing to move
            assert step.abs().max() == 0
            continue
        assert torch.dot(step, direction) > 0
        # Adam's first step moves every coordinate by lr * sign(adapted - current)
        moved = direction != 0
        assert torch.allclose(step[moved], 1e-2 * direction[moved].sign(), atol=1e-4)


def test_giml_config_parses():
    from lightning_gi.tools.giml import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs/giml/dcgan_photos.yaml"), "--print_config"])
    assert info.value.code in (0, None)


@pytest.mark.parametrize("victim_size", [8, 16])
def test_gias_average_pools_stylegan2_output_to_victim_size(victim_size, lean_trainer_kwargs):
    """Item 7: a 32 px generator average-pooled by 32 // victim_size (the authors pool 512 px by 8 to 64 px)."""
    torch.manual_seed(0)
    sg = StyleGAN2Generator(z_dim=8, w_dim=8, img_resolution=32, mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=64, channel_max=8)).eval()
    dm = victim_batch(sg, n=2, size=victim_size)
    attack = GIAS(generator=sg, latent_space="w+", latent_steps=2, param_steps=1, label_strategy=SharedLabels())
    fit(attack, dm, lean_trainer_kwargs)
    assert attack.reconstruction()["images"].shape == (2, 3, victim_size, victim_size)
    # the map is block averaging: each victim pixel is the mean of its k x k block of generator pixels
    k = 32 // victim_size
    with torch.no_grad():
        raw = sg.synthesis(attack.fixed_input)
        blocks = ((raw + 1) / 2).reshape(2, 3, victim_size, k, victim_size, k).mean(dim=(3, 5))
        mapped = attack.output_map(raw) * attack.inputs.std + attack.inputs.mean
    assert torch.allclose(mapped, blocks, atol=1e-6)


def test_gias_rejects_non_integer_pooling_factor():
    from lightning_gi.generators import GenerativeOutput

    torch.manual_seed(0)
    sg = StyleGAN2Generator(z_dim=8, w_dim=8, img_resolution=32, mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=64, channel_max=8)).eval()
    with pytest.raises(ValueError, match="integer multiple"):  # fails at bind, before any step
        GIAS(generator=sg, latent_space="w+", label_strategy=SharedLabels()).bind(victim_batch(sg, n=2, size=12).attack_inputs())
    out = GenerativeOutput((-1.0, 1.0), (3, 12, 12), torch.zeros(3, 1, 1), torch.ones(3, 1, 1))
    with pytest.raises(ValueError, match="integer multiple"):
        out(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="integer multiple"):  # no silent upsampling either
        out(torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- GIML (item 6)
def test_gradient_tasks_observe_single_image_gradients():
    """Authors' train_gen.py: a task's gradients are the N single-image gradients, not one batch mean."""
    dm = GradientTasks(LeNet(num_classes=14), image_shape=(3, 32, 32), batch_size=3, num_tasks=2)
    task = dm.task(0)
    assert len(task.observations) == 3
    model, x, y = task.inputs.model, task.victim_input, task.ground_truth.labels
    for i, part in enumerate(task.observations):
        assert part.observation.batch_size == 1
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        expected = torch.autograd.grad(loss, list(model.parameters()))
        for g, e in zip(part.observation.gradients, expected):
            assert torch.allclose(g, e, atol=1e-6)
    # the batch-mean observation is kept for evaluation, and is the mean of the parts
    for j, g in enumerate(task.inputs.observation.gradients):
        assert torch.allclose(g, torch.stack([p.observation.gradients[j] for p in task.observations]).mean(0), atol=1e-6)
    batch = GradientTasks(LeNet(num_classes=14), image_shape=(3, 32, 32), batch_size=3, num_tasks=2, gradients_per_task="batch")
    assert len(batch.task(0).observations) == 1


def test_gradient_tasks_one_victim_trained_every_n_tasks():
    """Authors' train_gen.py: one victim, an SGD step (lr 1e-4) on the task's batch every 50 tasks."""
    dm = GradientTasks(LeNet(num_classes=14), image_shape=(3, 32, 32), batch_size=2, num_tasks=4, victim_update_every=2, victim_lr=0.5)
    w0 = [p.detach().clone() for p in dm.task(0).inputs.model.parameters()]
    t1 = dm.task(1)
    assert all(torch.equal(a, b) for a, b in zip(w0, t1.inputs.model.parameters()))  # not re-initialised per task
    assert dm.after_task(dm.task(0)) is False
    assert all(torch.equal(a, b) for a, b in zip(w0, dm.model.parameters()))
    copy_model = LeNet(num_classes=14)
    copy_model.load_state_dict(dm.model.state_dict())
    loss = torch.nn.functional.cross_entropy(copy_model(t1.victim_input), t1.ground_truth.labels)
    grads = torch.autograd.grad(loss, list(copy_model.parameters()))
    assert dm.after_task(t1) is True
    for p, w, g in zip(dm.model.parameters(), w0, grads):
        assert torch.allclose(p.detach(), w - 0.5 * g, atol=1e-6)
    state = dm.state_dict()
    other = GradientTasks(LeNet(num_classes=14), image_shape=(3, 32, 32), batch_size=2, num_tasks=4, victim_update_every=2)
    other.load_state_dict(state)
    assert other.tasks_done == 2 and all(torch.equal(a, b) for a, b in zip(other.model.parameters(), dm.model.parameters()))
    reinit = GradientTasks(LeNet(num_classes=14), image_shape=(3, 32, 32), batch_size=2, num_tasks=4, victim_mode="reinit")
    a = [p.detach().clone() for p in reinit.task(0).inputs.model.parameters()]
    assert not all(torch.equal(x, y) for x, y in zip(a, reinit.task(1).inputs.model.parameters()))


def test_giml_inner_objective_matches_each_image_to_its_own_gradient():
    """At the true latents, image i reproduces single-image gradient i: the task's distance is ~0."""
    gen = tiny_dcgan()
    dm = GradientTasks(LeNet(num_classes=14), image_shape=(3, 32, 32), batch_size=2, num_tasks=1)
    task = dm.task(0)
    seed = torch.Generator().manual_seed(7)
    z_true = gen.sample_latents(2, "z", generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        private = (gen(z_true) + 1) / 2
    # replace the task's private images by generator samples and re-observe them one by one
    from lightning_gi.observation import capture_observation

    x = (private - task.inputs.mean) / task.inputs.std
    for i, part in enumerate(task.observations):
        part.observation = capture_observation(task.inputs.model, x[i : i + 1], task.ground_truth.labels[i : i + 1], share_labels=True)
    giml = GIML(gen, latent_steps=0, adapt_steps=1, generator_out=None, priors=[], latent_l2=0.0)
    _, z, stats = giml.inner_loop(task.observations, generator=seed)
    assert torch.equal(z, z_true)
    assert stats["adapt_first"] < 1e-5
    swapped = [task.observations[1], task.observations[0]]
    _, _, stats_swapped = giml.inner_loop(swapped, generator=torch.Generator().manual_seed(7))
    assert stats_swapped["adapt_first"] > 1e-2


def test_giml_authors_defaults():
    giml = GIML("dcgan32", generator_kwargs=dict(z_dim=8, ngf=4), generator_out=None)
    z = torch.randn(4, 8)
    assert float(giml.latent_penalty_value(z)) == pytest.approx(float(z.pow(2).sum().sqrt()))  # ||z||_2
    assert giml.latent_l2 == 1e-3 and float(giml.priors[0].weight) == 1e-4
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert sorted(giml._scheduler(opt, 8).milestones) == [3, 5, 7]  # MultiStepLR at 3/8, 5/8, 7/8
    ms = GIML("dcgan32", generator_kwargs=dict(z_dim=8, ngf=4), generator_out=None, latent_penalty="mean_square", milestone_fractions=None)
    assert float(ms.latent_penalty_value(z)) == pytest.approx(float(z.pow(2).mean()))
    assert ms._scheduler(opt, 8) is None
    with pytest.raises(ValueError, match="latent_penalty"):
        GIML("dcgan32", generator_kwargs=dict(z_dim=8, ngf=4), generator_out=None, latent_penalty="l1")


# ---------------------------------------------------------------- the CPU demo: public prior, runs, progress
def _short_demo(tmp_path: Path, max_steps: int) -> Path:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/gias_dcgan_demo.yaml").read_text())
    cfg["trainer"].update(max_steps=max_steps, enable_progress_bar=False, logger=False, default_root_dir=str(tmp_path))
    out = tmp_path / "demo.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_demo_config_prior_is_the_public_digits_prior():
    """The demo attacks PRIVATE digits with a prior fitted to the disjoint PUBLIC digits (same distribution)."""
    import yaml

    from lightning_gi.generators import get_generator_config
    from lightning_gi.generators.train_dcgan import prior_recipe

    cfg = yaml.safe_load((ROOT / "configs/gias_dcgan_demo.yaml").read_text())
    gen = get_generator_config(cfg["model"]["init_args"]["generator"])
    data = cfg["data"]["init_args"]
    assert prior_recipe(gen.name)["dataset"] == data["source"]["init_args"]["dataset"] == "digits"
    assert gen.kwargs["img_channels"] == data["image_shape"][0] and gen.resolution == data["image_shape"][1]


def test_demo_config_runs_a_few_steps_with_a_public_prior(tmp_path, monkeypatch):
    from lightning_gi.cli import run
    from lightning_gi.generators.train_dcgan import train_digits_generator

    train_digits_generator(str(tmp_path / "dcgan_digits32.pt"), steps=3, ngf=4, progress=False)
    monkeypatch.setenv("LIGHTNING_GI_CHECKPOINTS", str(tmp_path))
    cli = run(["fit", "--config", str(_short_demo(tmp_path, 3))])
    attack = cli.model
    assert attack.generator.ngf == 4 and attack.step_count == 3  # the prepared public prior, not a new fit
    rec = attack.reconstruction()
    assert rec["images"].shape == (4, 1, 32, 32) and torch.isfinite(rec["images"]).all()


@pytest.mark.slow
def test_demo_fits_its_prior_on_first_use_with_progress_on_stderr(tmp_path, monkeypatch, capfd):
    """Item 8 of issue 14: the generator fit (the demo's longest phase) reports step/loss/ETA on stderr."""
    from lightning_gi.cli import run

    from lightning_gi.checkpoints import find_checkpoint

    monkeypatch.chdir(tmp_path)  # the fitted file goes to ./checkpoints/ of the working directory
    monkeypatch.delenv("LIGHTNING_GI_CHECKPOINTS", raising=False)
    if find_checkpoint("dcgan_digits32.pt") is not None:
        pytest.skip("a dcgan_digits32.pt is installed: nothing to fit")
    cli = run(["fit", "--config", str(_short_demo(tmp_path, 1))])
    err = capfd.readouterr().err
    assert "[train_dcgan] step 600/600" in err and "ETA" in err and "public images" in err
    assert (tmp_path / "checkpoints" / "dcgan_digits32.pt").is_file()
    assert cli.model.step_count == 1 and cli.model.generator.img_channels == 1
