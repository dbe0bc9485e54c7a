"""What the attacker observes never holds the private batch or a recipe to rebuild it (issue 11, item 8).

Every victim DataModule writes an observation (in memory and, through the project's save function, to a
file); neither may hold the batch's dataset indices or the batch seed (with the bundled data either one
rebuilds the exact private images), nor any tensor equal to the private images. The ground truth travels
only in ``GroundTruth`` (``dm.ground_truth()``), read by metric callbacks.
"""
import torch

from lightning_gi.observation import GradientObservation
from lightning_gi.victim import FedSGDVictim, LeNet, ObservationFileVictim, TensorBatchVictim
from lightning_gi.victim.data import build_dataset, select_batch
from lightning_gi.victim.threat_models import ThreatModelVictim

BATCH_SEED = 48611  # distinctive: no honest metadata value equals it by chance
SIZE = 16
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _model() -> LeNet:
    torch.manual_seed(0)
    return LeNet(num_classes=14, image_size=SIZE)


def _private_indices(batch_size: int) -> list[int]:
    ds = build_dataset("photographs", image_size=SIZE, channels=3)
    return select_batch(ds, batch_size, seed=BATCH_SEED)[2]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _assert_private(metadata: dict, indices: list[int], where: str) -> None:
    for key, value in metadata.items():
        k = str(key).lower()
        assert "indic" not in k and "index" not in k, f"{where}: metadata key {key!r} names dataset indices"
        assert "seed" not in k or k.startswith("model"), f"{where}: metadata key {key!r} holds a data seed"
        assert not (isinstance(value, int) and not isinstance(value, bool) and value == BATCH_SEED), (
            f"{where}: metadata {key!r} equals the batch seed"
        )
        if isinstance(value, str):
            assert str(BATCH_SEED) not in value, f"{where}: metadata {key!r}={value!r} holds the batch seed"
            assert ",".join(map(str, indices)) not in value or len(indices) < 2, (
                f"{where}: metadata {key!r}={value!r} lists the private indices"
            )


def _assert_no_images(raw, images: torch.Tensor, where: str) -> None:
    normalised = (images - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)
    for t in _tensors(raw):
        for secret in (images, normalised, images[0], normalised[0]):
            if t.numel() == secret.numel() and t.is_floating_point():
                assert not torch.allclose(t.reshape(secret.shape).float(), secret, atol=1e-5), (
                    f"{where}: a tensor in the observation equals the private images"
                )


def _check_observation(obs: GradientObservation, path, images: torch.Tensor, indices: list[int], where: str) -> None:
    _assert_private(obs.metadata, indices, where)
    if not path.exists():
        obs.save(path)  # the project's save function
    raw = torch.load(path, map_location="cpu", weights_only=True)
    _assert_private(raw.get("metadata", {}), indices, f"{where} (file)")
    _assert_no_images(raw, images, f"{where} (file)")
    _assert_no_images(obs.to_dict(), images, where)


def test_fedsgd_victim_observation_hides_the_batch(tmp_path):
    path = tmp_path / "fedsgd.pt"
    dm = FedSGDVictim(_model(), dataset="photographs", batch_size=3, batch_seed=BATCH_SEED, image_shape=(3, SIZE, SIZE),
                      mean=MEAN, std=STD, share_labels=True, save_observation=str(path))
    dm.setup()
    truth = dm.ground_truth()
    assert truth is not None and truth.images.shape == (3, 3, SIZE, SIZE)  # metrics still get the ground truth
    assert path.exists()
    _check_observation(dm.observation, path, truth.images, _private_indices(3), "FedSGDVictim")


def test_tensor_batch_victim_observation_hides_the_batch(tmp_path):
    ds = build_dataset("photographs", image_size=SIZE, channels=3)
    images, labels, indices = select_batch(ds, 2, seed=BATCH_SEED)
    dm = TensorBatchVictim(_model(), images, labels, mean=MEAN, std=STD)
    _check_observation(dm.observation, tmp_path / "tensors.pt", images, indices, "TensorBatchVictim")


def test_threat_model_victim_observation_hides_the_batch(tmp_path):
    path = tmp_path / "threat.pt"
    dm = ThreatModelVictim(_model(), dataset="photographs", batch_size=2, batch_seed=BATCH_SEED,
                           image_shape=(3, SIZE, SIZE), mean=MEAN, std=STD, save_observation=str(path))
    dm.setup()
    truth = dm.ground_truth()
    assert truth is not None
    _check_observation(dm.observation, path, truth.images, _private_indices(2), "ThreatModelVictim")


def test_observation_file_victim_round_trip_hides_the_batch(tmp_path):
    source = tmp_path / "captured.pt"
    client = FedSGDVictim(_model(), dataset="photographs", batch_size=2, batch_seed=BATCH_SEED,
                          image_shape=(3, SIZE, SIZE), mean=MEAN, std=STD, save_observation=str(source))
    client.setup()
    truth = client.ground_truth()
    gt_path = tmp_path / "truth.pt"
    torch.save({"images": truth.images, "labels": truth.labels}, gt_path)
    dm = ObservationFileVictim(_model(), observation_path=str(source), ground_truth_path=str(gt_path),
                               image_shape=(3, SIZE, SIZE), mean=MEAN, std=STD)
    dm.setup()
    assert torch.equal(dm.ground_truth().images, truth.images)  # the ground truth comes only from its own file
    _check_observation(dm.observation, tmp_path / "resaved.pt", truth.images, _private_indices(2), "ObservationFileVictim")


def test_victim_with_each_source_hides_the_batch(tmp_path):
    """The ONE victim DataModule (issue 13): simulated clients on DatasetImages and TensorImages, and an
    ObservationFile read back, never put the batch or its recipe into what the attack sees."""
    from lightning_gi.victim import DatasetImages, FedAvgClient, ObservationFile, TensorImages, Victim

    path = tmp_path / "victim.pt"
    dm = Victim(_model(), source=DatasetImages(batch_size=1, batch_seed=BATCH_SEED), image_shape=(3, SIZE, SIZE),
                mean=MEAN, std=STD, client=FedAvgClient(2, 0.1), num_clients=2, share_labels=True,
                save_observation=str(path))
    truth = dm.ground_truth()
    assert truth.images.shape == (2, 3, SIZE, SIZE)
    _check_observation(dm.observation, path, truth.images, _private_indices(2), "Victim(DatasetImages)")
    ds = build_dataset("photographs", image_size=SIZE, channels=3)
    images, labels, indices = select_batch(ds, 2, seed=BATCH_SEED)
    tensors = Victim(_model(), source=TensorImages(images, labels), mean=MEAN, std=STD)
    _check_observation(tensors.observation, tmp_path / "t.pt", images, indices, "Victim(TensorImages)")
    read = Victim(_model(), source=ObservationFile(str(path)), image_shape=(3, SIZE, SIZE))
    inputs = read.attack_inputs()
    assert read.ground_truth() is None  # no ground-truth file: the metrics get nothing, the attack never does
    _check_observation(inputs.observation, tmp_path / "read.pt", truth.images, _private_indices(2), "Victim(ObservationFile)")
