import os
import warnings

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from lightning_gi.cli import quiet_known_warnings  # noqa: E402

quiet_known_warnings()


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
