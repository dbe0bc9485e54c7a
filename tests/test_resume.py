"""Runs that lose nothing: last.ckpt in every run, resume in the same directory with the user's config,
atomic checkpoint writes, signal exit statuses (issues 14.5, 16.5, 16.7-16.10)."""
import errno
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from factories import run_cli  # in-process CLI: (exit status, stdout, stderr)

LENET = {"class_path": "lightning_gi.victim.LeNet", "init_args": {"num_classes": 10, "image_size": 16}}


class SendSignal(pl.Callback):
    """Fault injection: the process receives ``signum`` after step ``at`` (as from kill or Ctrl+C)."""

    def __init__(self, signum: int = 15, at: int = 2) -> None:
        self.signum, self.at = signum, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)


def _config(tmp_path, max_steps=4, version=None, callbacks=()):
    cfg = {
        "model": {"class_path": "lightning_gi.attacks.IDLG", "init_args": {"seed": 0, "init": "randn"}},
        "data": {"class_path": "lightning_gi.victim.FedSGDVictim",
                 "init_args": {"model": LENET, "image_shape": [3, 16, 16], "dataset": "photographs"}},
        "trainer": {
            "max_steps": max_steps, "enable_progress_bar": False, "accelerator": "cpu", "enable_model_summary": False,
            "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "demo", "version": version}},
            "callbacks": [{"class_path": "lightning_gi.callbacks.ReconstructionMonitor", "init_args": {"every_n_steps": 100}},
                          *callbacks],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_every_run_writes_last_ckpt_and_a_resumed_run_continues_in_its_directory(tmp_path):
    config = _config(tmp_path, max_steps=4)
    code, out, err = run_cli(["fit", "--config", config])
    assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "demo" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file(), sorted(p.name for p in run.rglob("*"))
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 4

    # README's resume line, as written: --ckpt_path <run>/checkpoints/last.ckpt
    code, out, err = run_cli(["fit", "--config", config, "--trainer.max_steps=6", "--ckpt_path", str(last)])
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").iterdir()) == ["version_0"]
    assert f"log_dir: {run}" in out
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 6
    assert not [p for p in run.rglob("*") if ".partial-" in p.name]


def test_readme_resume_line_names_the_file_a_run_writes():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "--ckpt_path" in line)
    assert "runs/idlg_lenet/version_0/checkpoints/last.ckpt" in line and "configs/idlg_lenet.yaml" in line


def test_checkpoint_hyperparameters_never_change_the_config(tmp_path):
    config = _config(tmp_path, max_steps=2)
    assert run_cli(["fit", "--config", config])[0] == 0
    last = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    ckpt["hyper_parameters"] = {"_class_path": "lightning_gi.attacks.IDLG", "init": "zeros", "seed": 7}
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)
    code, out, err = run_cli(["fit", "--config", config, "--trainer.max_steps=4", "--ckpt_path", str(crafted)])
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 3 and "init" in err and "seed" in err, err

    # hyperparameters equal to the config are harmless
    ckpt["hyper_parameters"] = {"_class_path": "lightning_gi.attacks.IDLG", "init": "randn", "seed": 0}
    torch.save(ckpt, crafted)
    code, out, err = run_cli(["fit", "--config", config, "--trainer.max_steps=3", "--ckpt_path", str(crafted)])
    assert code == 0, err[-3000:]


def test_an_explicit_version_that_holds_outputs_is_refused(tmp_path):
    config = _config(tmp_path, max_steps=1, version=3)
    assert run_cli(["fit", "--config", config])[0] == 0
    code, out, err = run_cli(["fit", "--config", config])
    assert code == 2 and "version_3 already holds outputs" in err and "--ckpt_path" in err, err[-2000:]


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_with_a_non_zero_status_and_a_checkpoint(tmp_path, signum, status):
    callback = {"class_path": "test_resume.SendSignal", "init_args": {"signum": int(signum), "at": 2}}
    config = _config(tmp_path, max_steps=50, callbacks=[callback])
    previous = signal.getsignal(signum)
    try:
        code, out, err = run_cli(["fit", "--config", config])
    finally:
        signal.signal(signum, previous)
    assert code == status, (code, err[-3000:])
    last = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file() and 2 <= torch.load(last, weights_only=True)["global_step"] < 50


def test_atomic_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from lightning_gi import files
    from lightning_gi.callbacks.checkpointing import AtomicCheckpointIO

    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "epoch=0-step=60.ckpt"
    io_plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 50}, target)

    def disk_full(fd):  # the data was written, the disk fills up before it is on disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)  # the one atomic writer (lightning_gi/files.py)
    with pytest.raises(OSError, match="No space left"):
        io_plugin.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 60}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert torch.load(target, weights_only=True)["global_step"] == 50  # the previous complete file survives

    fresh = tmp_path / "ckpts" / "last.ckpt"
    with pytest.raises(OSError):
        io_plugin.save_checkpoint({"global_step": 1}, fresh)
    assert not fresh.exists() and sorted(p.name for p in target.parent.iterdir()) == [target.name]
