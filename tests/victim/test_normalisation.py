"""The victim's input normalisation is an explicit choice (issue 14.1).

A client that normalises with mean 0.5 / std 0.25 attacked without that normalisation matches the gradient
to ~1e-8 and still reports a saturated image, so for user models the choice is required: ``mean``/``std``,
``normalization: none``, or the observation file's metadata; a conflict between config and file is refused.
"""
import contextlib
import io
import textwrap

import pytest
import torch
from torch import nn

from lightning_gi.cli import main
from lightning_gi.observation import GradientObservation, capture_observation
from lightning_gi.victim import (
    DatasetImages,
    FedSGDVictim,
    LeNet,
    ObservationFile,
    ObservationFileVictim,
    TensorBatchVictim,
    Victim,
)

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
SHAPE = (3, 8, 8)

USER_MODULE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's model (not one of lightning_gi's demo victims): one linear layer on the flat input."""

    def __init__(self, num_classes: int = 4, in_features: int = 192) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))
'''


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    """``tinyvictim.TinyNet`` importable by class path, as a user's own package would be."""
    (tmp_path / "tinyvictim.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import tinyvictim

    importlib.reload(tinyvictim)
    return tinyvictim.TinyNet


def _client(model_cls, tmp_path, metadata=None):
    """A client that normalises with MEAN/STD; returns (model, image in [0,1], observation path)."""
    torch.manual_seed(0)
    model = model_cls()
    torch.save(model.state_dict(), tmp_path / "victim.pt")
    image = torch.rand(1, *SHAPE) * 0.8 + 0.1
    x = (image - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)
    capture_observation(model, x, torch.tensor([2]), metadata=metadata).save(tmp_path / "obs.pt")
    return model, image, tmp_path / "obs.pt"


def _analytic_image(dm) -> torch.Tensor:
    """The one image behind a linear layer's gradient (dW row / db row = the input), mapped to image space
    with the normalisation the DataModule resolved: equals the private image only if that is right."""
    inputs = dm.attack_inputs()
    g_w, g_b = inputs.observation.gradients
    row = int(g_b.abs().argmax())
    x = (g_w[row] / g_b[row]).view(1, *SHAPE)
    return inputs.to_image_space(x)


def test_user_model_without_normalisation_is_refused_with_the_fix(user_model, tmp_path):
    _client(user_model, tmp_path)
    for make in (
        lambda: ObservationFileVictim(user_model(), observation_path=str(tmp_path / "obs.pt"), image_shape=SHAPE).setup(),
        lambda: FedSGDVictim(user_model(num_classes=14), dataset="photographs", image_shape=(3, 8, 8)),
        lambda: Victim(user_model(), source=ObservationFile(str(tmp_path / "obs.pt")), image_shape=SHAPE).setup(),
        lambda: Victim(user_model(num_classes=14), source=DatasetImages("photographs"), image_shape=SHAPE),
    ):
        with pytest.raises(ValueError, match=r"normalisation of the victim TinyNet is (not set|set neither).*mean.*normalization: none"):
            make()


def test_cli_refuses_the_unnormalised_user_model_before_step_0(user_model, tmp_path, monkeypatch):
    """The issue's case through the CLI: one-line error, exit status 2, no step taken (no outputs)."""
    _client(user_model, tmp_path)
    (tmp_path / "attack.yaml").write_text(textwrap.dedent("""\
        model:
          class_path: lightning_gi.attacks.InvertingGradients
        data:
          class_path: lightning_gi.victim.ObservationFileVictim
          init_args:
            observation_path: obs.pt
            weights_path: victim.pt
            model: {class_path: tinyvictim.TinyNet, init_args: {num_classes: 4}}
            image_shape: [3, 8, 8]
        trainer:
          max_steps: 5
          enable_progress_bar: false
        """))
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as info:
        main(["fit", "--config", "attack.yaml"])
    assert info.value.code == 2
    message = err.getvalue().strip().splitlines()
    assert len(message) <= 2 and "normalization: none" in message[0] and "mean" in message[0], message
    assert not list(tmp_path.rglob("reconstruction.pt"))


def test_normalisation_from_the_observation_metadata(user_model, tmp_path):
    """The file states mean/std; the config gives none: the attack gets them and the image comes back."""
    model, image, path = _client(user_model, tmp_path, metadata={"mean": MEAN, "std": STD})
    assert GradientObservation.load(path).metadata["mean"] == MEAN  # lists of floats survive the file format
    dm = ObservationFileVictim(user_model(), observation_path=str(path), weights_path=str(tmp_path / "victim.pt"),
                               image_shape=SHAPE)
    assert torch.allclose(_analytic_image(dm), image, atol=1e-4)
    # the same gradient read as un-normalised gives a wrong (partly saturated) image: the choice matters
    obs = GradientObservation.load(path)
    GradientObservation(obs.gradients, obs.batch_size).save(path.with_name("plain.pt"))
    dm_none = ObservationFileVictim(user_model(), observation_path=str(path.with_name("plain.pt")), image_shape=SHAPE,
                                    weights_path=str(tmp_path / "victim.pt"), normalization="none")
    assert float((_analytic_image(dm_none) - image).abs().max()) > 0.3


def test_normalisation_none_in_the_metadata(user_model, tmp_path):
    torch.manual_seed(0)
    model = user_model()
    image = torch.rand(1, *SHAPE)
    capture_observation(model, image, torch.tensor([1]), metadata={"normalization": "none"}).save(tmp_path / "obs.pt")
    dm = ObservationFileVictim(model, observation_path=str(tmp_path / "obs.pt"), image_shape=SHAPE)
    assert torch.allclose(_analytic_image(dm), image, atol=1e-4)


def test_a_simulated_client_records_its_normalisation_for_a_later_attack(tmp_path):
    """FedSGDVictim(save_observation=...) writes mean/std into the file; attacking the file needs no config."""
    client = FedSGDVictim(LeNet(num_classes=14, image_size=16), dataset="photographs", image_shape=(3, 16, 16),
                          mean=MEAN, std=STD, save_observation=str(tmp_path / "obs.pt"))
    client.setup()
    dm = ObservationFileVictim(LeNet(num_classes=14, image_size=16), observation_path=str(tmp_path / "obs.pt"),
                               image_shape=(3, 16, 16))
    dm.setup()
    assert dm.mean.flatten().tolist() == MEAN and dm.std.flatten().tolist() == STD


def test_config_and_metadata_that_disagree_are_refused(user_model, tmp_path):
    _, _, path = _client(user_model, tmp_path, metadata={"mean": MEAN, "std": STD})
    for kwargs in ({"mean": [0.5] * 3, "std": [0.5] * 3}, {"normalization": "none"}):
        dm = ObservationFileVictim(user_model(), observation_path=str(path), image_shape=SHAPE, **kwargs)
        with pytest.raises(ValueError, match="contradicts the observation's metadata"):
            dm.setup()
    agreeing = ObservationFileVictim(user_model(), observation_path=str(path), image_shape=SHAPE, mean=MEAN, std=STD)
    agreeing.setup()  # the same values in both places are fine


def test_inconsistent_choices_are_refused(user_model):
    with pytest.raises(ValueError, match="normalization is 'none' but mean/std are also given"):
        TensorBatchVictim(user_model(), torch.rand(1, *SHAPE), torch.tensor([0]), mean=MEAN, std=STD, normalization="none")
    with pytest.raises(ValueError, match="normalization must be one of"):
        TensorBatchVictim(user_model(), torch.rand(1, *SHAPE), torch.tensor([0]), normalization="imagenet")
    with pytest.raises(ValueError, match="'mean_std' but mean/std are not given"):
        FedSGDVictim(user_model(num_classes=14), image_shape=SHAPE, normalization="mean_std")


def test_demo_victims_keep_their_unnormalised_default():
    dm = FedSGDVictim(LeNet(num_classes=10, image_size=16), image_shape=(3, 16, 16))
    assert dm.mean.abs().sum() == 0 and torch.all(dm.std == 1)


def test_threat_model_victim_requires_the_choice(user_model):
    from lightning_gi.victim import ThreatModelVictim

    with pytest.raises(ValueError, match="normalisation of the victim TinyNet is not set"):
        ThreatModelVictim(user_model(num_classes=14), image_shape=SHAPE)
    ThreatModelVictim(user_model(num_classes=14), image_shape=SHAPE, normalization="none")
