"""Shared fixtures. The test tree mirrors the package (tests/attacks, tests/victim, ...); project-level checks
(configs, docs, CLI, benchmarks) sit at the top. Shared factories live in tests/factories.py (importable from every
test module: this directory is put on sys.path below) and the common ones are fixtures here."""
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/factories.py for every test module

from lightning_gi.cli import quiet_known_warnings  # noqa: E402

import factories  # noqa: E402

quiet_known_warnings()


@pytest.fixture
def lenet16():
    """The DLG sigmoid LeNet for 16x16 inputs, 10 classes, initialisation re-drawn from seed 0."""
    return factories.lenet(size=16, seed=0)


@pytest.fixture
def photos16():
    """Two bundled photographs at 16x16 (distinct labels) and their labels."""
    return factories.photos(2, size=16, seed=0)


@pytest.fixture
def lean_trainer_kwargs(tmp_path):
    """A Trainer without logger/progress bar/checkpoints, writing into tmp_path."""
    return dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
    )


@pytest.fixture(autouse=True)
def _no_checkpoint_lookup_outside(tmp_path_factory, monkeypatch):
    """Tests never see pretrained files of the developer's machine."""
    empty = tmp_path_factory.mktemp("empty_ckpts")
    monkeypatch.setenv("LIGHTNING_GI_CHECKPOINTS", str(empty))
    monkeypatch.setenv("TORCH_HOME", str(empty))
    warnings.filterwarnings("ignore", category=UserWarning, module="pytorch_lightning")
