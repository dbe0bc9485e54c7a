"""DivergenceGuard: start-of-run checks (zero observation, NaN victim, NaN unknowns from a checkpoint),
consecutive restores that end in an error, and checks every k steps."""
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from lightning_gi.attacks import IDLG
from lightning_gi.callbacks import DivergenceGuard, ReconstructionMonitor, ReconstructionReport
from lightning_gi.callbacks.guard import DivergenceError, UninformativeObservationError, VictimOutputError
from lightning_gi.victim import LeNet, TensorBatchVictim
from lightning_gi.victim.defenses import TopKPruning
from factories import one_photo_case


def _case(seed=0):
    return one_photo_case(seed)


def _adam(p):
    return torch.optim.Adam(p, lr=0.05)


class _Steps(pl.Callback):
    """Counts the optimiser steps that ran (to prove a check fires before step 0)."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


def test_all_zero_observation_stops_before_step_zero(lean_trainer_kwargs):
    """TopKPruning(1.0) zeroes every gradient entry: nothing to reconstruct, say so before step 0."""
    model, image, label = _case()
    victim = TensorBatchVictim(model, image, label, defenses=[TopKPruning(prune_ratio=1.0)], share_labels=True)
    steps = _Steps()
    report = ReconstructionReport(save_every_n_steps=0)
    trainer = pl.Trainer(max_steps=20, callbacks=[steps, report, DivergenceGuard()], **lean_trainer_kwargs)
    with pytest.raises(UninformativeObservationError, match="observed gradient is all zero"):
        trainer.fit(_shared_labels_attack(), victim)
    assert steps.batches == 0
    assert report.metrics is None  # nothing optimised: no outputs claiming a result


def _shared_labels_attack(**kwargs):
    from lightning_gi.labels.idlg import SharedLabels

    return IDLG(optimizer=_adam, label_strategy=SharedLabels(), seed=0, **kwargs)


class NaNBehindWhere(torch.nn.Module):
    """A victim whose output is NaN, selected by torch.where: its gradients are zero, not NaN."""

    def __init__(self):
        super().__init__()
        self.net = LeNet(num_classes=10, image_size=16)

    def forward(self, x):
        out = self.net(x)
        return torch.where(out > -1e9, torch.full_like(out, float("nan")), out)


def test_victim_with_nan_output_stops_with_clear_message(lean_trainer_kwargs):
    _, image, label = _case()
    torch.manual_seed(0)
    victim = TensorBatchVictim(NaNBehindWhere(), image, label, share_labels=True, num_classes=10)
    steps = _Steps()
    trainer = pl.Trainer(max_steps=20, callbacks=[steps, DivergenceGuard()], **lean_trainer_kwargs)
    with pytest.raises(VictimOutputError, match="non-finite outputs"):
        trainer.fit(_shared_labels_attack(), victim)
    assert steps.batches == 0


def test_zero_dummy_gradient_is_detected(lean_trainer_kwargs):
    """A victim that is flat in its parameters at the dummy batch (ReLU cut-off, no bias; the real image
    passes the cut-off, the all-zero init does not) gives the optimiser nothing to follow."""
    class CutOff(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 16 * 16, 10, bias=False)

        def forward(self, x):
            return self.fc(torch.relu(x.flatten(1) - 0.3))

    _, image, label = _case()
    torch.manual_seed(0)
    victim = TensorBatchVictim(CutOff(), image, label, share_labels=True, num_classes=10)
    trainer = pl.Trainer(max_steps=5, callbacks=[DivergenceGuard()], **lean_trainer_kwargs)
    with pytest.raises(VictimOutputError, match="gradient on the dummy batch is all zero"):
        trainer.fit(_shared_labels_attack(init="zeros"), victim)
    # the same victim from a random start is fine
    trainer = pl.Trainer(max_steps=2, callbacks=[DivergenceGuard()], **lean_trainer_kwargs)
    trainer.fit(_shared_labels_attack(init="rand"), victim)


def test_healthy_run_passes_the_start_checks(lean_trainer_kwargs):
    model, image, label = _case()
    guard = DivergenceGuard()
    trainer = pl.Trainer(max_steps=3, callbacks=[guard], **lean_trainer_kwargs)
    trainer.fit(_shared_labels_attack(), TensorBatchVictim(model, image, label, share_labels=True))
    assert trainer.global_step == 3 and guard.restores == 0


class _InjectNaN(pl.Callback):
    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            with torch.no_grad():
                pl_module.dummy_images.fill_(float("nan"))


def test_restores_are_counted_consecutively(lean_trainer_kwargs):
    """Two divergences far apart, each recovered, with max_restores=1: the run goes on to the end (before,
    the count over the whole run stopped it at the second)."""
    model, image, label = _case()
    guard = DivergenceGuard(snapshot_every_n_steps=3, max_restores=1)
    trainer = pl.Trainer(max_steps=30, callbacks=[_InjectNaN([6, 20]), guard], **lean_trainer_kwargs)
    attack = IDLG(optimizer=_adam, seed=0)
    trainer.fit(attack, TensorBatchVictim(model, image, label))
    assert trainer.global_step == 30
    assert [e["step"] for e in guard.events] == [6, 20] and guard.restores == 2
    assert torch.isfinite(attack.dummy_images).all()


def test_persistent_divergence_raises_and_outputs_are_written(tmp_path, lean_trainer_kwargs):
    """Divergence right after every restore: after max_restores consecutive restores, an error (so the CLI
    exits non-zero), and the report still writes the best (finite) reconstruction, marked interrupted."""
    import json

    model, image, label = _case()
    guard = DivergenceGuard(snapshot_every_n_steps=5, max_restores=2)
    report = ReconstructionReport(save_every_n_steps=0)
    trainer = pl.Trainer(max_steps=50, callbacks=[_InjectNaN(range(4, 50)), guard, report], **lean_trainer_kwargs)
    attack = IDLG(optimizer=_adam, seed=0)
    with pytest.raises(DivergenceError, match="after 2 consecutive restores"):
        trainer.fit(attack, TensorBatchVictim(model, image, label))
    assert trainer.global_step < 10
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and "DivergenceError" in metrics["stop_reason"]
    assert torch.isfinite(attack.reconstruction()["images"]).all()


def test_checking_every_k_steps_restores_a_finite_state(lean_trainer_kwargs):
    """check_every_n_steps=5: a NaN at step 6 is found at step 10 and the unknowns go back to the finite
    snapshot of step 5 (snapshots are taken only at checks that found them finite)."""
    model, image, label = _case()
    guard = DivergenceGuard(check_every_n_steps=5, snapshot_every_n_steps=5, max_restores=1)
    attack = IDLG(optimizer=_adam, seed=0)
    trainer = pl.Trainer(max_steps=20, callbacks=[_InjectNaN([6]), guard], **lean_trainer_kwargs)
    trainer.fit(attack, TensorBatchVictim(model, image, label))
    assert guard.events == [{"step": 10, "restored_to": 5}]
    assert trainer.global_step == 20 and torch.isfinite(attack.dummy_images).all()
    assert float(attack.best_loss) < float("inf")


def test_deferred_checks_act_one_check_later(lean_trainer_kwargs):
    """check_mode="deferred" (the default on CUDA, where reading a check at once would block the host; forced here
    on the CPU): each check is read at the next one, so a NaN injected at step 6 is found at step 7 and the
    unknowns go back to the snapshot of step 3, taken when its own check had read finite."""
    model, image, label = _case()
    guard = DivergenceGuard(snapshot_every_n_steps=3, max_restores=1, check_mode="deferred")
    attack = IDLG(optimizer=_adam, seed=0)
    trainer = pl.Trainer(max_steps=20, callbacks=[_InjectNaN([6]), guard], **lean_trainer_kwargs)
    trainer.fit(attack, TensorBatchVictim(model, image, label))
    assert guard.events == [{"step": 6, "restored_to": 3, "found_at_step": 7}]
    assert trainer.global_step == 20 and torch.isfinite(attack.dummy_images).all()


def test_deferred_checks_still_stop_a_persistent_divergence(lean_trainer_kwargs):
    model, image, label = _case()
    guard = DivergenceGuard(snapshot_every_n_steps=5, max_restores=2, check_mode="deferred")
    trainer = pl.Trainer(max_steps=50, callbacks=[_InjectNaN(range(4, 50)), guard], **lean_trainer_kwargs)
    with pytest.raises(DivergenceError, match="after 2 consecutive restores"):
        trainer.fit(IDLG(optimizer=_adam, seed=0), TensorBatchVictim(model, image, label))
    assert trainer.global_step < 12


def test_bad_check_mode():
    with pytest.raises(ValueError, match="check_mode"):
        DivergenceGuard(check_mode="sometimes")


def test_nan_unknowns_from_a_checkpoint_give_a_clear_error(tmp_path, lean_trainer_kwargs):
    """Resuming from a checkpoint whose unknowns are NaN: the monitor (which runs first) does not crash,
    the guard stops the run with a message naming the cause."""
    model, image, label = _case()
    kwargs = dict(lean_trainer_kwargs, enable_checkpointing=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    pl.Trainer(max_steps=3, callbacks=[ckpt], **kwargs).fit(IDLG(optimizer=_adam, seed=0), TensorBatchVictim(model, image, label))
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    state = torch.load(path, weights_only=False)
    state["state_dict"]["dummy_images"].fill_(float("nan"))
    torch.save(state, path)

    kwargs["logger"] = CSVLogger(str(tmp_path), name="csv")
    callbacks = [ReconstructionMonitor(every_n_steps=1), DivergenceGuard()]
    trainer = pl.Trainer(max_steps=10, callbacks=callbacks, **kwargs)
    with pytest.warns(UserWarning, match="not finite"), pytest.raises(DivergenceError, match="unknowns are not finite"):
        trainer.fit(IDLG(optimizer=_adam, seed=0), TensorBatchVictim(model, image, label), ckpt_path=str(path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a CPU has no device to wait for)")
def test_guard_checks_do_not_synchronise_on_cuda():
    """check_mode="auto" on CUDA: the per-step checks run under torch.cuda.set_sync_debug_mode("error") (any
    synchronising call raises); the flags are read later, and a finite run keeps taking snapshots."""

    class Unknowns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Parameter(torch.randn(64, device="cuda"))

    class StubTrainer:  # what the guard reads from a Trainer
        global_step = 0
        optimizers: list = []

    module, trainer = Unknowns(), StubTrainer()
    guard = DivergenceGuard(snapshot_every_n_steps=2)
    guard.on_train_start(trainer, module)  # its start-of-run check may sync: outside the checked region
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 9):
            trainer.global_step = step
            with torch.no_grad():
                module.x.mul_(0.5)
            guard.on_train_batch_end(trainer, module, (module.x ** 2).sum(), None, step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    guard.on_train_epoch_end(trainer, module)  # reads what is still pending (may wait)
    assert guard.events == [] and guard.restores == 0
    assert guard._snapshot_step >= 6 and not guard._pending
