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
        normalization="none",  # the plain-torch client fed [0, 1] images
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


# ------------------------------------------------------------------ issue 16.13: hostile files
HOSTILE_CASES = [
    ("sparse", lambda m: _obs_dict(m, gradients=[torch.zeros_like(p).to_sparse() if i == 0 else torch.zeros_like(p)
                                               for i, p in enumerate(m.parameters())]), r"gradients\[0\] is a torch.sparse_coo tensor"),
    ("meta", lambda m: _obs_dict(m, gradients=[torch.empty(p.shape, device="meta") if i == 1 else torch.zeros_like(p)
                                             for i, p in enumerate(m.parameters())]), r"gradients\[1\] is a meta tensor"),
    ("huge batch", lambda m: _obs_dict(m, batch_size=10**6), r"'batch_size' is 1000000, above the supported maximum"),
    ("duplicate names", lambda m: _obs_dict(m, param_names=["a"] * 8), r"'param_names' lists \['a'\] more than once"),
    ("nested metadata", lambda m: _obs_dict(m, metadata={"x": [1, 2]}), r"'metadata' entry 'x'"),
]


@pytest.mark.parametrize("name,make,message", HOSTILE_CASES, ids=[c[0] for c in HOSTILE_CASES])
def test_hostile_observations_fail_in_one_sentence(tmp_path, name, make, message):
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    torch.save(make(model), tmp_path / "bad.pt")
    with pytest.raises(ObservationError, match=message) as info:
        GradientObservation.load(tmp_path / "bad.pt")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content,message", [
    (b"", r"is empty \(0 bytes\): not a torch.save file"),
    (b"gradients = [1, 2]\n", r"is not a torch.save file"),
    (b"\x1f\x8b\x08\x00" + b"\x00" * 40, r"is gzip-compressed"),
])
def test_files_that_are_not_torch_save_files_say_so(tmp_path, content, message):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(ObservationError, match=message):
        GradientObservation.load(tmp_path / "x.pt")


def test_truncated_file_says_truncated(tmp_path):
    model = LeNet(num_classes=10, image_size=16)
    capture_observation(model, torch.rand(1, 3, 16, 16), torch.tensor([1])).save(tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    for cut in (len(data) // 3, len(data) - 30):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(ObservationError, match=r"truncated or corrupt"):
            GradientObservation.load(tmp_path / "cut.pt")


def test_tuple_param_names_and_swapped_tensors(tmp_path):
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    obs = capture_observation(model, torch.rand(1, 3, 16, 16), torch.tensor([1]))
    d = obs.to_dict()
    as_tuple = GradientObservation.from_dict(dict(d, param_names=tuple(d["param_names"])))
    as_tuple.check_against(model, 10)  # a tuple of names is fine (was a bare StopIteration)
    g, names = list(d["gradients"]), list(d["param_names"])
    assert g[2].shape == g[4].shape
    g[2], g[4] = g[4], g[2]
    names[2], names[4] = names[4], names[2]
    swapped = GradientObservation.from_dict(dict(d, gradients=g, param_names=names))
    with pytest.raises(ObservationError, match=r"different order.*body.4.weight, body.2.weight are out of place"):
        swapped.check_against(model, 10)


def test_ground_truth_is_validated_before_the_attack(tmp_path):
    """3 labels for 1 image, a 0..255 image, a wrong size: refused at setup (before step 0)."""
    from lightning_gi.observation import load_ground_truth

    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    image = torch.rand(1, 3, 16, 16)
    capture_observation(model, image, torch.tensor([1])).save(tmp_path / "obs.pt")
    cases = [
        ({"images": image, "labels": torch.tensor([1, 2, 3])}, r"3 labels for 1 image"),
        ({"images": image * 255}, r"in \[0,1\]"),
        ({"images": torch.rand(1, 3, 8, 8)}, r"'images' has shape \(1, 3, 8, 8\), expected \[1,3,16,16\]"),
        ({"images": image, "labels": torch.tensor([10])}, r"labels \[10\] outside \[0, 10\)"),
        ([image], r"must hold a dict"),
    ]
    for i, (content, message) in enumerate(cases):
        torch.save(content, tmp_path / f"gt{i}.pt")
        with pytest.raises(ObservationError, match=message):
            load_ground_truth(tmp_path / f"gt{i}.pt", (3, 16, 16), batch_size=1, num_classes=10)
        dm = ObservationFileVictim(model=LeNet(num_classes=10, image_size=16), observation_path=str(tmp_path / "obs.pt"),
                                   ground_truth_path=str(tmp_path / f"gt{i}.pt"), image_shape=(3, 16, 16))
        with pytest.raises(ObservationError, match=message):
            dm.setup("fit")
    torch.save({"images": image, "labels": torch.tensor([1])}, tmp_path / "good.pt")
    images, labels = load_ground_truth(tmp_path / "good.pt", (3, 16, 16), batch_size=1, num_classes=10)
    assert torch.equal(images, image) and labels.tolist() == [1]


@pytest.mark.parametrize("version", [torch.tensor([]), torch.tensor([1]), "1", 1.0, True, None])
def test_format_version_must_be_a_plain_int(version):
    """Found by the loader fuzz: a tensor format_version raised a RuntimeError (no values) or passed as 1."""
    with pytest.raises(ObservationError, match="unsupported observation format_version"):
        GradientObservation.from_dict({"format_version": version, "gradients": [torch.zeros(2)], "batch_size": 1})
