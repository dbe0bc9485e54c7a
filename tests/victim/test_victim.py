"""The ONE victim DataModule (issue 13, point 2): ``Victim`` with pluggable sources and the threat model.

Each source through ``Victim`` must give the observation an independent computation gives (the private batch
drawn with ``select_batch``, the update computed with :mod:`lightning_gi.client` functions or plain autograd),
and so must the compatibility names, which only map their arguments to a source. Bad combinations are refused
with one sentence.
"""
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from lightning_gi.client import apply_defenses, client_gradient, unrolled_update
from lightning_gi.observation import GradientObservation
from lightning_gi.victim import (
    DatasetImages,
    FedAvgClient,
    FedSGDVictim,
    LeNet,
    ObservationFile,
    ObservationFileVictim,
    TensorBatchVictim,
    TensorImages,
    ThreatModelVictim,
    Victim,
    VictimDataModule,
)
from lightning_gi.victim.data import build_dataset, select_batch
from lightning_gi.victim.defenses import GaussianNoise, TopKPruning
from lightning_gi.victim.models import reinitialise
from factories import photos

SIZE = 16
SHAPE = (3, SIZE, SIZE)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _model(seed: int = 0) -> LeNet:
    return reinitialise(LeNet(num_classes=14, image_size=SIZE), seed)


def _pooled_model() -> torch.nn.Module:
    """A user model that takes any image size (global pooling)."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 14))


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)


def _autograd_gradient(model, inputs, labels):
    """FedSGD by hand: the batch-mean cross-entropy gradient from torch.autograd."""
    loss = torch.nn.functional.cross_entropy(model(inputs), labels)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def _assert_same(actual, expected, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-5)


def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.count(". ") == 0, message


# ------------------------------------------------------------------------------- sources through Victim
def test_dataset_images_give_the_fedsgd_gradient_of_the_seeded_batch():
    defenses = [TopKPruning(prune_ratio=0.5), GaussianNoise(std=1e-3, seed=4)]
    dm = Victim(_model(), source=DatasetImages("photographs", batch_size=3, batch_seed=3), image_shape=SHAPE,
                mean=MEAN, std=STD, defenses=defenses, share_labels=True)
    images, labels = photos(3, size=SIZE, seed=3)
    truth = dm.ground_truth()
    assert torch.equal(truth.images, images) and torch.equal(truth.labels, labels)
    expected = apply_defenses(defenses, _autograd_gradient(_model(), _normalise(images), labels), client_index=0)
    obs = dm.observation
    _assert_same(obs.gradients, expected)
    assert obs.batch_size == 3 and torch.equal(obs.labels, labels)
    assert obs.metadata["threat_model"] == "fedsgd" and obs.metadata["dataset"] == "photographs"
    assert obs.metadata["mean"] == pytest.approx(MEAN) and obs.metadata["std"] == pytest.approx(STD)
    # the compatibility name gives the same observation
    old = FedSGDVictim(_model(), dataset="photographs", batch_size=3, batch_seed=3, image_shape=SHAPE, mean=MEAN,
                       std=STD, defenses=[TopKPruning(prune_ratio=0.5), GaussianNoise(std=1e-3, seed=4)], share_labels=True)
    _assert_same(old.observation.gradients, obs.gradients, atol=0)
    assert old.observation.metadata == obs.metadata


def test_dataset_images_batch_size_is_per_client_under_fedavg():
    client = FedAvgClient(local_steps=2, local_lr=0.1, local_batch_size=1)
    noise = [GaussianNoise(std=1e-3, seed=9)]
    dm = Victim(_model(), source=DatasetImages(batch_size=2, batch_seed=3), image_shape=SHAPE, mean=MEAN, std=STD,
                client=client, num_clients=2, aggregation="sum", defenses=noise)
    images, labels = photos(4, size=SIZE, seed=3)  # two clients of 2: one select_batch draw of 4
    assert torch.equal(dm.ground_truth().images, images)
    x = _normalise(images)
    expected = None
    for k in range(2):
        update, _ = unrolled_update(_model(), x[2 * k:2 * k + 2], labels[2 * k:2 * k + 2], 2, 0.1, 1)
        update = apply_defenses(noise, update, client_index=k)
        expected = update if expected is None else [a + b for a, b in zip(expected, update)]
    _assert_same(dm.observation.gradients, expected)
    meta = dm.observation.metadata
    assert meta["client_batch_sizes"] == "2,2" and meta["local_steps"] == 2 and meta["aggregation"] == "sum"
    old = ThreatModelVictim(_model(), client=FedAvgClient(2, 0.1, 1), num_clients=2, aggregation="sum", batch_size=2,
                            batch_seed=3, image_shape=SHAPE, mean=MEAN, std=STD, defenses=[GaussianNoise(std=1e-3, seed=9)])
    _assert_same(old.observation.gradients, dm.observation.gradients, atol=0)


def test_tensor_images_are_fed_as_given_by_default():
    images, labels = photos(2, size=SIZE, seed=3)
    dm = Victim(_model(), source=TensorImages(images, labels))
    assert dm.image_shape == SHAPE and torch.all(dm.mean == 0) and torch.all(dm.std == 1)
    _assert_same(dm.observation.gradients, _autograd_gradient(_model(), images, labels))
    assert dm.observation.metadata["dataset"] == "tensors" and dm.observation.labels is None
    old = TensorBatchVictim(_model(), images, labels)
    _assert_same(old.observation.gradients, dm.observation.gradients, atol=0)
    normalised = Victim(_model(), source=TensorImages(images, labels), mean=MEAN, std=STD)
    _assert_same(normalised.observation.gradients, _autograd_gradient(_model(), _normalise(images), labels))
    via_classmethod = Victim.from_tensors(_model(), images, labels, num_clients=2, aggregation="sum")
    expected = [a + b for a, b in zip(client_gradient(_model(), images[:1], labels[:1])[0],
                                      client_gradient(_model(), images[1:], labels[1:])[0])]
    _assert_same(via_classmethod.observation.gradients, expected)


def test_observation_file_is_read_with_its_normalisation_and_ground_truth(tmp_path):
    client = Victim(_model(), source=DatasetImages(batch_size=2, batch_seed=3), image_shape=SHAPE, mean=MEAN, std=STD,
                    save_observation=str(tmp_path / "obs.pt"))
    truth = client.ground_truth()
    torch.save({"images": truth.images, "labels": truth.labels}, tmp_path / "truth.pt")
    dm = Victim(_model(), source=ObservationFile(str(tmp_path / "obs.pt"), str(tmp_path / "truth.pt")), image_shape=SHAPE)
    saved = GradientObservation.load(tmp_path / "obs.pt")
    _assert_same(dm.observation.gradients, saved.gradients, atol=0)
    assert dm.mean.flatten().tolist() == pytest.approx(MEAN) and dm.std.flatten().tolist() == pytest.approx(STD)
    assert torch.equal(dm.ground_truth().images, truth.images) and torch.equal(dm.ground_truth().labels, truth.labels)
    no_truth = Victim(_model(), source=ObservationFile(str(tmp_path / "obs.pt")), image_shape=SHAPE)
    assert no_truth.ground_truth() is None
    old = ObservationFileVictim(_model(), str(tmp_path / "obs.pt"), str(tmp_path / "truth.pt"), image_shape=SHAPE)
    _assert_same(old.observation.gradients, dm.observation.gradients, atol=0)
    assert old.observation_path == str(tmp_path / "obs.pt") and torch.equal(old.mean, dm.mean)


def test_the_attack_never_sees_the_ground_truth():
    dm = Victim(_model(), source=DatasetImages(batch_size=2, batch_seed=48611), image_shape=SHAPE, mean=MEAN, std=STD)
    inputs = dm.attack_inputs()
    assert set(vars(inputs)) == {"model", "observation", "image_shape", "mean", "std", "num_classes"}
    private = dm.ground_truth().images
    for value in vars(inputs.observation).values():
        if isinstance(value, torch.Tensor) and value.numel() == private.numel():
            assert not torch.allclose(value.float().reshape(private.shape), private)
    assert not any("48611" in str(v) for v in inputs.observation.metadata.values())


# ------------------------------------------------------------------------------- compatibility names
def test_compatibility_names_build_a_victim_with_the_right_source(tmp_path):
    images, labels = photos(2, size=SIZE, seed=3)
    torch.save(GradientObservation(_autograd_gradient(_model(), images, labels), 2).to_dict(), tmp_path / "obs.pt")
    built = {
        FedSGDVictim(_model(), batch_size=2, image_shape=SHAPE): DatasetImages,
        ThreatModelVictim(_model(), batch_size=1, num_clients=2, image_shape=SHAPE): DatasetImages,
        TensorBatchVictim(_model(), images, labels): TensorImages,
        ThreatModelVictim.from_tensors(_model(), images, labels): TensorImages,
        ObservationFileVictim(_model(), observation_path=str(tmp_path / "obs.pt"), image_shape=SHAPE): ObservationFile,
    }
    for dm, source in built.items():
        assert isinstance(dm, Victim) and type(dm.source) is source, type(dm).__name__
    assert VictimDataModule is Victim  # the CLI's data: base class
    tb = TensorBatchVictim(_model(), images, labels)
    tb.images, tb.labels = images[:1], labels[:1]  # replaced before the observation is built
    assert tb.observation.batch_size == 1


def test_the_cli_parser_builds_victim_and_the_old_names():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VictimDataModule, "data")
    lenet = {"class_path": "lightning_gi.victim.LeNet", "init_args": {"num_classes": 14, "image_size": SIZE}}
    new = yaml.safe_load(f"""
        class_path: lightning_gi.victim.Victim
        init_args:
          image_shape: [3, {SIZE}, {SIZE}]
          num_clients: 2
          source:
            class_path: lightning_gi.victim.DatasetImages
            init_args: {{dataset: photographs, batch_size: 1, batch_seed: 3}}
        """)
    old = {"class_path": "lightning_gi.victim.threat_models.ThreatModelVictim",
           "init_args": {"image_shape": [3, SIZE, SIZE], "num_clients": 2, "batch_size": 1, "batch_seed": 3}}
    built = []
    for data in (new, old):
        data["init_args"].update(model=lenet, model_seed=0)
        built.append(parser.instantiate_classes(parser.parse_object({"data": data})).data)
    assert type(built[0]) is Victim and isinstance(built[1], ThreatModelVictim)
    _assert_same(built[0].observation.gradients, built[1].observation.gradients, atol=0)


# ------------------------------------------------------------------------------- bad combinations
def test_bad_combinations_are_refused_in_one_sentence(tmp_path):
    images, labels = photos(3, size=SIZE, seed=3)
    obs_path = str(tmp_path / "obs.pt")
    cases = [
        (lambda: Victim(_model(), source=ObservationFile(obs_path), image_shape=SHAPE, num_clients=2,
                        defenses=[GaussianNoise()]), r"num_clients, defenses describe a simulated client"),
        (lambda: ObservationFileVictim(_model(), obs_path, image_shape=SHAPE, share_labels=True), r"share_labels"),
        (lambda: Victim(_model(), source=TensorImages(images, labels), num_clients=2), r"cannot be split evenly"),
        (lambda: Victim(_model(), source=TensorImages(images, labels), image_shape=(3, 8, 8)), r"differs from the shape"),
        (lambda: Victim(_model(), source="photographs"), r"source must be a DatasetImages"),
        (lambda: Victim(_model(), image_shape=SHAPE, aggregation="median"), r"aggregation must be one of"),
        (lambda: Victim(_model(), image_shape=SHAPE, num_clients=0), r"num_clients must be an int >= 1"),
        (lambda: Victim(_model(), source=TensorImages(images, labels), mean=MEAN, std=STD, normalization="none"),
         r"normalization is 'none' but mean/std"),
        (lambda: DatasetImages("nope"), r"unknown dataset 'nope'"),
        (lambda: DatasetImages(batch_size=0), r"batch_size must be >= 1"),
        (lambda: DatasetImages(label_mode="sorted"), r"label_mode must be one of"),
        (lambda: DatasetImages(num_distinct=2), r"num_distinct is only used with label_mode='repeated'"),
        (lambda: TensorImages(images[0], labels), r"images must be a tensor \[N,C,H,W\]"),
        (lambda: TensorImages(images, labels[:2]), r"need labels \[N\]"),
        (lambda: Victim(_pooled_model(), source=DatasetImages(batch_size=1), image_shape=(3, SIZE, 8),
                        normalization="none").setup(), r"gives square images"),
        (lambda: Victim(LeNet(num_classes=10, image_size=SIZE), source=TensorImages(images, labels + 10)).setup(),
         r"outside \[0, 10\) of the victim"),
    ]
    for make, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            make()
        _one_sentence(str(info.value))
