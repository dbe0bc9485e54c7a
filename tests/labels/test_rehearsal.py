"""AutoLabels with labelled public images: the label rule is chosen by rehearsal on public batches.

Victims: a small CNN trained until confident on four classes of the bundled photographs (``confident_case`` in
conftest.py: attacked, public and training images are disjoint crops) and an untrained ResNet-18. Every gradient
comes from a real backward pass.
"""
import numpy as np
import pytest
import torch
from torch import nn

from lightning_gi.client import ThreatModel
from lightning_gi.labels import ILRG, LLG, AutoLabels, CalibratedCounts, label_strategy
from lightning_gi.labels.rehearsal import average_counts, draw_rehearsal_batch, head_gradient_observation, labels_off
from lightning_gi.observation import capture_observation
from lightning_gi.victim import torchvision_classifier
from lightning_gi.victim.data import BundledPhotographs, select_batch

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _off(got, truth, c=20):
    return labels_off(got, truth, c)


def test_rehearsal_picks_the_calibrated_counts_on_a_confident_victim(confident_case):
    model, x, y, public_x, public_y = confident_case
    obs = capture_observation(model, x, y)
    auto = AutoLabels(image_size=16).use_public_images(public_x, public_y)
    got = auto(obs, model)
    d = auto.diagnostics
    assert d["chosen_strategy"] == "calibrated", d["rehearsal_labels_off"]
    assert set(d["rehearsal_labels_off"]) == {"ilrg", "calibrated", "evolutionary", "bias-corrected", "llg",
                                              "calibrated+evolutionary"}
    ilrg_off = _off(ILRG(refine_steps=6)(obs, model), y)
    llg_off = _off(LLG()(obs, model), y)
    assert _off(got, y) < min(ilrg_off, llg_off), (_off(got, y), ilrg_off, llg_off)  # measured 6 vs 24 and 19 of 32
    assert "warning" in d and "rehearsal" in d["warning"]  # the rehearsal's own error is reported


def test_rehearsal_keeps_ilrg_exact_on_an_untrained_victim():
    photos = BundledPhotographs(image_size=32, crops_per_photo=8)
    attacked = [i for i in range(len(photos.targets)) if i % 2 == 0]
    public = [i for i in range(len(photos.targets)) if i % 2 == 1]
    torch.manual_seed(0)
    model = torchvision_classifier("resnet18", num_classes=100).eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pool = torch.utils.data.Subset(photos, attacked)
    pool.targets, pool.num_classes = [photos.targets[i] for i in attacked], photos.num_classes
    x, y, _ = select_batch(pool, 64, seed=1, label_mode="repeated", num_distinct=10)
    obs = capture_observation(model, (x - mean) / std, y)
    auto = AutoLabels(image_size=32, mean=MEAN, std=STD).use_public_images(
        photos.images[public], torch.tensor([photos.targets[i] for i in public]))
    assert auto(obs, model).tolist() == y.sort().values.tolist()
    assert auto.diagnostics["chosen_strategy"] == "ilrg"
    assert auto.diagnostics["rehearsal_labels_off"]["ilrg"] == 0.0
    assert "warning" not in auto.diagnostics


def test_no_rehearsal_for_updates_it_cannot_model(confident_case):
    model, x, y, public_x, public_y = confident_case
    auto = AutoLabels(image_size=16).use_public_images(public_x, public_y)
    fedavg = ThreatModel(threat_model="fedavg", local_steps=2, local_lr=0.1).to_metadata()
    for metadata, why in ((fedavg, "not one FedSGD gradient"), ({"defenses": True}, "defended")):
        obs = capture_observation(model, x, y, metadata=metadata)
        auto(obs, model)
        assert why in auto.diagnostics["rehearsal_skipped"]
        assert "rehearsal_labels_off" not in auto.diagnostics


def test_public_file_through_the_registry(confident_case, tmp_path):
    model, x, y, public_x, public_y = confident_case
    path = tmp_path / "public.pt"
    torch.save({"images": public_x, "labels": public_y}, path)
    obs = capture_observation(model, x, y)
    from_file = label_strategy("auto", image_size=16, public_path=str(path))
    in_memory = AutoLabels(image_size=16).use_public_images(public_x, public_y)
    assert from_file(obs, model).tolist() == in_memory(obs, model).tolist()
    assert from_file.diagnostics["rehearsal_labels_off"] == in_memory.diagnostics["rehearsal_labels_off"]
    with pytest.raises(ValueError, match="rehearsals"):
        AutoLabels(rehearsals=0)


@pytest.mark.parametrize("training", [False, True])
def test_head_gradient_observation_matches_the_client_and_keeps_buffers(training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 7))
    model.train(training)
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 3, 3, 6, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_obs = head_gradient_observation(model, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    full = capture_observation(model, x, y)
    assert torch.allclose(head_obs.gradients[-2], full.gradients[-2], atol=1e-6)
    assert torch.allclose(head_obs.gradients[-1], full.gradients[-1], atol=1e-6)
    assert all(float(g.abs().max()) == 0.0 for g in head_obs.gradients[:-2])


def test_rehearsal_batches_follow_the_counts_and_leave_most_images_out():
    labels = torch.tensor([0] * 8 + [2] * 8 + [5] * 3)
    gen = torch.Generator().manual_seed(0)
    pick = draw_rehearsal_batch(labels, {0: 5, 2: 1, 9: 3}, gen)  # class 9 has no public images: replaced by 5
    counts = np.bincount(labels[pick].numpy(), minlength=10)
    assert counts[0] == 5 and counts[2] == 1 and counts[5] == 3 and counts.sum() == 9
    assert len(set(pick[labels[pick] == 0].tolist())) == 2  # a quarter of class 0's 8 images, repeated
    assert len(set(pick[labels[pick] == 5].tolist())) == 1  # at least one image per class


def test_the_attack_gives_public_images_the_victims_normalisation():
    """A strategy built without ``mean``/``std`` (as a config would) normalises its public images as the victim's
    inputs once an attack uses it: before, raw [0, 1] images went into a victim trained on normalised ones."""
    from lightning_gi.attacks import InvertingGradients
    from lightning_gi.labels.calibrated import class_mean_softmax
    from lightning_gi.victim import DatasetImages, LeNet, Victim
    from lightning_gi.victim.data import BundledDigits

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    dm = Victim(LeNet(num_classes=10, image_size=16), source=DatasetImages("digits", batch_size=4, label_mode="repeated",
                num_distinct=2), image_shape=(3, 16, 16), mean=mean, std=std, model_seed=0)
    dm.setup()
    public = BundledDigits(image_size=16, channels=3, pool="public")
    for strategy in (CalibratedCounts.from_tensors(public.images, torch.tensor(public.targets)),
                     AutoLabels(image_size=16).use_public_images(public.images, torch.tensor(public.targets))):
        attack = InvertingGradients(label_strategy=strategy).bind(dm.attack_inputs())
        attack.recover_labels()
        calibrated = strategy if isinstance(strategy, CalibratedCounts) else strategy.public
        inputs = (public.images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        expected, _ = class_mean_softmax(dm.attack_inputs().model.eval(), inputs, torch.tensor(public.targets), 10)
        table, _ = calibrated.probabilities(attack.victim, 10)
        assert torch.allclose(table, expected, atol=1e-6)


def test_average_counts_keeps_the_batch_size():
    a = torch.tensor([0, 0, 0, 0, 2, 2])  # counts 4, 0, 2
    b = torch.tensor([0, 0, 1, 1, 2, 2])  # counts 2, 2, 2
    assert average_counts([a, b], 4).tolist() == [0, 0, 0, 1, 2, 2]  # mean 3, 1, 2
    c = torch.tensor([1, 1, 1, 1, 1, 1])  # counts 0, 6, 0
    got = average_counts([a, c], 3)  # mean 2, 3, 1: already integers
    assert got.tolist() == [0, 0, 1, 1, 1, 2]
