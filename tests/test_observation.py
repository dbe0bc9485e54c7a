"""The observation file: written by plain torch code, loaded safely, validated with clear errors."""
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_gi.attacks import IDLG
from lightning_gi.observation import GradientObservation, ObservationError, capture_observation
from lightning_gi.victim import LeNet, ObservationFileVictim
from lightning_gi.victim.data import BundledPhotographs


class PlainNet(nn.Module):
    """A user's own model, unknown to lightning_gi (sigmoid features so the iDLG rule holds)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 16 * 16, num_classes)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


def _plain_torch_capture(tmp_path, image, label):
    """What a user writes in their own FL code: no lightning_gi import involved."""
    torch.manual_seed(3)
    model = PlainNet()
    loss = nn.functional.cross_entropy(model(image), label)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save({"format_version": 1, "gradients": list(grads), "batch_size": 1}, tmp_path / "obs.pt")
    torch.save({"images": image, "labels": label}, tmp_path / "gt.pt")


def test_plain_torch_observation_loads_and_attacks(tmp_path, lean_trainer_kwargs):
    image = BundledPhotographs(image_size=16, crops_per_photo=1)[2][0].unsqueeze(0)
    label = torch.tensor([4])
    _plain_torch_capture(tmp_path, image, label)
    dm = ObservationFileVictim(
        model=PlainNet(),
        observation_path=str(tmp_path / "obs.pt"),
        ground_truth_path=str(tmp_path / "gt.pt"),
        weights_path=str(tmp_path / "model.pt"),
        image_shape=(3, 16, 16),
    )
    attack = IDLG(seed=0)
    pl.Trainer(max_steps=40, **lean_trainer_kwargs).fit(attack, dm)
    rec = attack.reconstruction()
    assert rec["labels"].tolist() == [4]
    mse = float(((rec["images"] - image) ** 2).mean())
    assert mse < 1e-3, mse


def test_roundtrip_keeps_everything(tmp_path):
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    obs = capture_observation(model, torch.rand(2, 3, 16, 16), torch.tensor([1, 7]), share_labels=True, metadata={"client": "a"})
    obs.save(tmp_path / "o.pt")
    raw = torch.load(tmp_path / "o.pt", weights_only=True)  # readable without lightning_gi's classes
    assert raw["format_version"] == 1 and raw["batch_size"] == 2
    back = GradientObservation.load(tmp_path / "o.pt")
    assert back.labels.tolist() == [1, 7] and back.metadata == {"client": "a"}
    assert back.param_names == [n for n, _ in model.named_parameters()]
    for a, b in zip(obs.gradients, back.gradients):
        assert torch.equal(a, b)
    back.check_against(model, 10)


def _obs_dict(model, **overrides):
    grads = [torch.randn_like(p) for p in model.parameters()]
    d = {"format_version": 1, "gradients": grads, "batch_size": 1}
    d.update(overrides)
    return d


BAD_CASES = [
    ("nan", lambda m: _obs_dict(m, gradients=[torch.full_like(p, math.nan) if i == 2 else torch.zeros_like(p) for i, p in enumerate(m.parameters())]), r"gradients\[2\] .*NaN"),
    ("inf", lambda m: _obs_dict(m, gradients=[torch.full_like(p, math.inf) if i == 7 else torch.zeros_like(p) for i, p in enumerate(m.parameters())]), r"gradients\[7\] .*NaN/inf"),
    ("missing key", lambda m: {"format_version": 1, "gradients": [torch.zeros(1)]}, r"missing required key.*batch_size"),
    ("bad version", lambda m: _obs_dict(m, format_version=99), r"unsupported observation format_version 99"),
    ("unknown key", lambda m: _obs_dict(m, gradient=[1]), r"unknown observation key.*gradient"),
    ("labels size", lambda m: _obs_dict(m, labels=torch.tensor([1, 2])), r"'labels' has 2 entries but 'batch_size' is 1"),
    ("int gradient", lambda m: _obs_dict(m, gradients=[torch.zeros(3, dtype=torch.long)]), r"gradients\[0\] has dtype torch.int64"),
    ("batch size", lambda m: _obs_dict(m, batch_size=0), r"'batch_size' must be a positive int"),
    ("not a dict", lambda m: [1, 2, 3], r"must hold a dict"),
]


@pytest.mark.parametrize("name,make,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_observations_fail_clearly(tmp_path, name, make, message):
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    torch.save(make(model), tmp_path / "bad.pt")
    with pytest.raises(ObservationError, match=message):
        GradientObservation.load(tmp_path / "bad.pt")


def test_shape_mismatch_names_the_tensor(tmp_path):
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    d = _obs_dict(model)
    d["gradients"][4] = torch.zeros(3, 3)
    torch.save(d, tmp_path / "o.pt")
    obs = GradientObservation.load(tmp_path / "o.pt")
    with pytest.raises(ObservationError, match=r"gradients\[4\] has shape \(3, 3\) but the victim's parameter 'body.4.weight'"):
        obs.check_against(model)
    d["gradients"] = d["gradients"][:-1]
    torch.save(d, tmp_path / "o2.pt")
    with pytest.raises(ObservationError, match=r"has 7 gradient tensors but the victim model LeNet has 8 parameters"):
        GradientObservation.load(tmp_path / "o2.pt").check_against(model)


def test_label_out_of_range_and_truncated_file(tmp_path):
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    obs = GradientObservation(**{k: v for k, v in _obs_dict(model, labels=torch.tensor([12])).items() if k != "format_version"})
    with pytest.raises(ObservationError, match="contain a class >= num_classes=10"):
        obs.check_against(model, 10)
    obs = capture_observation(model, torch.rand(1, 3, 16, 16), torch.tensor([1]))
    obs.save(tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ObservationError, match="cannot read observation file"):
        GradientObservation.load(tmp_path / "cut.pt")
    with pytest.raises(ObservationError, match="not found"):
        GradientObservation.load(tmp_path / "nope.pt")


def test_code_in_an_observation_file_is_never_run(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format_version": 1, "gradients": [Evil()], "batch_size": 1}, f)
    with pytest.raises(ObservationError):
        GradientObservation.load(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_capture_rejects_inconsistent_batches():
    model = LeNet(num_classes=10, image_size=16)
    with pytest.raises(ObservationError, match="labels must be \\[N\\] with N=2"):
        capture_observation(model, torch.rand(2, 3, 16, 16), torch.tensor([1, 2, 3]))
    with pytest.raises(ObservationError, match="images must be"):
        capture_observation(model, torch.rand(3, 16, 16), torch.tensor([1]))
