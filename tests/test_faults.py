"""Faults and bad input: resumable runs, divergence recovery, and a table of clear errors."""
import re

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_gi.attacks import IDLG
from lightning_gi.callbacks import DivergenceGuard
from lightning_gi.checkpoints import CorruptCheckpointError, MissingCheckpointError
from lightning_gi.observation import GradientObservation, ObservationError, capture_observation
from lightning_gi.victim import FedSGDVictim, LeNet, ObservationFileVictim, TensorBatchVictim
from lightning_gi.victim.data import DatasetNotFoundError
from lightning_gi.victim.models import load_weights, torchvision_classifier
from factories import one_photo_case


def _case(seed=0):
    return one_photo_case(seed)


def _adam(p):
    return torch.optim.Adam(p, lr=0.05)


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, lean_trainer_kwargs):
    model, image, label = _case()
    full = IDLG(optimizer=_adam, seed=3)
    pl.Trainer(max_steps=12, **lean_trainer_kwargs).fit(full, TensorBatchVictim(model, image, label))

    kwargs = dict(lean_trainer_kwargs, enable_checkpointing=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, save_last=False)
    stopped = IDLG(optimizer=_adam, seed=3)
    pl.Trainer(max_steps=7, callbacks=[ckpt], **kwargs).fit(stopped, TensorBatchVictim(model, image, label))
    saved = sorted((tmp_path / "ckpt").glob("*step=5*.ckpt"))
    assert saved, list((tmp_path / "ckpt").iterdir())

    resumed = IDLG(optimizer=_adam, seed=999)  # a different init seed: the checkpoint must override it
    trainer = pl.Trainer(max_steps=12, **kwargs)
    trainer.fit(resumed, TensorBatchVictim(model, image, label), ckpt_path=str(saved[0]))
    assert trainer.global_step == 12
    torch.testing.assert_close(resumed.dummy_images.detach(), full.dummy_images.detach(), rtol=0, atol=0)
    assert float(resumed.best_loss) == float(full.best_loss)


class _InjectNaN(pl.Callback):
    """Fault injection: the unknowns become NaN after step ``at`` (as a diverging optimiser would)."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.dummy_images.fill_(float("nan"))


def test_divergence_is_detected_and_the_last_good_state_restored(lean_trainer_kwargs):
    model, image, label = _case()
    guard = DivergenceGuard(snapshot_every_n_steps=2, max_restores=2)
    attack = IDLG(optimizer=_adam, seed=0)
    trainer = pl.Trainer(max_steps=15, callbacks=[_InjectNaN(6), guard], **lean_trainer_kwargs)
    trainer.fit(attack, TensorBatchVictim(model, image, label))
    assert trainer.global_step == 15
    assert guard.restores == 1 and guard.events[0]["step"] == 6 and guard.events[0]["restored_to"] == 4
    assert torch.isfinite(attack.dummy_images).all()
    rec = attack.reconstruction()
    assert torch.isfinite(rec["images"]).all() and rec["matching_distance"] < float("inf")


def test_repeated_divergence_stops_with_best_result_kept(lean_trainer_kwargs):
    class _AlwaysNaN(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= 4:
                with torch.no_grad():
                    pl_module.dummy_images.fill_(float("nan"))

    model, image, label = _case()
    guard = DivergenceGuard(max_restores=2)
    attack = IDLG(optimizer=_adam, seed=0)
    trainer = pl.Trainer(max_steps=50, callbacks=[_AlwaysNaN(), guard], **lean_trainer_kwargs)
    from lightning_gi.callbacks.guard import DivergenceError  # issue 16.11: an error, so the CLI exits non-zero

    with pytest.raises(DivergenceError, match=r"non-finite loss or unknowns at step \d+ after 2 consecutive restores"):
        trainer.fit(attack, TensorBatchVictim(model, image, label))
    assert trainer.global_step < 50
    assert torch.isfinite(attack.reconstruction()["images"]).all()


def _write(path, obj):
    torch.save(obj, path)
    return str(path)


def _bad_inputs(tmp_path):
    """(name, thunk, error type, message pattern): every bad input a user can give, with its message."""
    model, image, label = _case()
    good = capture_observation(model, image, label)
    grads = good.gradients
    sd_path = _write(tmp_path / "lenet.pt", model.state_dict())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "lenet.pt").read_bytes()[:100])

    def obs_victim(obs_dict, **kw):
        path = _write(tmp_path / f"obs{len(list(tmp_path.glob('obs*.pt')))}.pt", obs_dict)
        return lambda: ObservationFileVictim(model=LeNet(num_classes=10, image_size=16), observation_path=path, image_shape=(3, 16, 16), **kw).setup()

    base = {"format_version": 1, "gradients": grads, "batch_size": 1}
    return [
        ("shape mismatch", obs_victim(dict(base, gradients=[grads[0][:, :1]] + grads[1:])), ObservationError,
         r"gradients\[0\] has shape \(12, 1, 5, 5\) but the victim's parameter 'body.0.weight'"),
        ("wrong number of tensors", obs_victim(dict(base, gradients=grads[:-2])), ObservationError,
         r"has 6 gradient tensors but the victim model LeNet has 8"),
        ("nan in observation", obs_victim(dict(base, gradients=grads[:3] + [grads[3] * float("nan")] + grads[4:])), ObservationError,
         r"gradients\[3\] contains \d+ NaN/inf"),
        ("labels out of range", obs_victim(dict(base, labels=torch.tensor([10]))), ObservationError,
         r"contain a class >= num_classes=10"),
        ("batch size vs labels", obs_victim(dict(base, labels=torch.tensor([1, 2]))), ObservationError,
         r"'labels' has 2 entries but 'batch_size' is 1"),
        ("image size vs model", lambda: TensorBatchVictim(LeNet(num_classes=10, image_size=16), torch.rand(1, 3, 20, 20), label),
         ValueError, r"does not accept inputs of shape \(3, 20, 20\)"),
        ("label out of range (simulated client)", lambda: TensorBatchVictim(model, image, torch.tensor([11])).setup(),
         ValueError, r"outside \[0, 10\)"),
        ("missing weights file", lambda: torchvision_classifier("resnet34", weights_path="resnet34-b627a593.pth"),
         MissingCheckpointError, r"'resnet34-b627a593.pth' not found.*checkpoints/README.md"),
        ("corrupt weights file", lambda: load_weights(LeNet(num_classes=10, image_size=16), str(truncated)),
         CorruptCheckpointError, r"truncated\.pt.*corrupt, truncated"),
        ("weights of another model", lambda: load_weights(LeNet(num_classes=5, image_size=16), sd_path),
         CorruptCheckpointError, r"does not fit LeNet"),
        ("missing observation file", lambda: GradientObservation.load(tmp_path / "nope.pt"), ObservationError,
         r"observation file not found"),
        ("missing dataset root", lambda: FedSGDVictim(model=LeNet(), dataset="cifar10", data_root=str(tmp_path / "none")).setup(),
         DatasetNotFoundError, r"cifar10.*none"),
        ("negative batch size", lambda: FedSGDVictim(model=LeNet(), batch_size=0), ValueError, r"batch_size must be >= 1"),
        ("non-positive std", lambda: TensorBatchVictim(model, image, label, std=[1.0, 0.0, 1.0]), ValueError, r"std must be positive"),
    ]


def test_bad_input_table(tmp_path):
    for name, thunk, error, pattern in _bad_inputs(tmp_path):
        with pytest.raises(error) as info:
            thunk()
        assert re.search(pattern, str(info.value), flags=re.S), f"{name}: {info.value}"


_tensors = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]),
    st.floats(allow_nan=True, allow_infinity=True, width=16),
)
_values = st.one_of(
    st.none(), st.integers(-3, 5), st.booleans(), st.text(max_size=4), _tensors,
    st.lists(_tensors, max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_observation_dicts = st.dictionaries(
    st.sampled_from(["format_version", "gradients", "batch_size", "labels", "param_names", "metadata", "loss_reduction", "other"]),
    _values,
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=st.one_of(_observation_dicts, _values), cut=st.one_of(st.none(), st.integers(0, 400)))
def test_fuzz_observation_loader(tmp_path, obj, cut):
    """Random dicts, shapes, dtypes and truncated files: a valid observation or ObservationError, nothing else."""
    path = tmp_path / "fuzz.pt"
    torch.save(obj, path)
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    try:
        obs = GradientObservation.load(path)
    except ObservationError:
        return
    assert isinstance(obs, GradientObservation) and obs.batch_size >= 1
    assert all(torch.isfinite(g).all() for g in obs.gradients)
