"""ReconstructionReport: headline label figure, saturation warning, captioned upscaled grid, interrupted runs."""
import json
import logging
import os
import signal

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from lightning_gi.attacks import IDLG
from lightning_gi.callbacks import ReconstructionReport
from lightning_gi.callbacks.report import write_captioned_grid
from lightning_gi.labels.idlg import SharedLabels
from lightning_gi.victim import LeNet, TensorBatchVictim
from lightning_gi.victim.data import BundledPhotographs

TRUE_LABELS = [6, 7, 4, 3]


class SortedSharedLabels(SharedLabels):
    """The right label multiset in class order (what count-based label recovery returns)."""

    def recover(self, observation, model):
        return torch.sort(super().recover(observation, model)).values


def _adam(p):
    return torch.optim.Adam(p, lr=0.05)


def _victim(n=4, size=16, **kwargs):
    torch.manual_seed(0)
    data = BundledPhotographs(image_size=size, crops_per_photo=1)
    images = torch.stack([data[i][0] for i in range(n)])
    return TensorBatchVictim(LeNet(num_classes=10, image_size=size), images, torch.tensor(TRUE_LABELS[:n]),
                             share_labels=True, **kwargs)


def _fit(tmp_path, lean_trainer_kwargs, callbacks, steps=3, victim=None, **attack_kwargs):
    attack = IDLG(optimizer=_adam, label_strategy=SortedSharedLabels(), seed=0, **attack_kwargs)
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, **lean_trainer_kwargs)
    trainer.fit(attack, victim if victim is not None else _victim())
    return trainer, attack


def test_permuted_labels_give_headline_accuracy_one(tmp_path, lean_trainer_kwargs, caplog):
    """Issue 14.2: recovered [3,4,6,7] vs true [6,7,4,3] is a perfect label recovery."""
    report = ReconstructionReport(save_every_n_steps=0)
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, lean_trainer_kwargs, [report])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["recovered_labels"] == sorted(TRUE_LABELS) and metrics["true_labels"] == TRUE_LABELS
    assert metrics["label_accuracy"] == 1.0 and metrics["labels_off"] == 0
    assert "label_accuracy_paired" in metrics and metrics["status"] == "finished"
    summary = caplog.text
    assert "labels 4/4 recovered (accuracy 1.00, 0 off; per-image pairing" in summary
    assert "label accuracy 0.00" not in summary


def test_grid_is_upscaled_and_captioned(tmp_path, lean_trainer_kwargs):
    """Issue 14.10: reconstruction.png shows each 16x16 image at >= 128 px with its captions; the raw
    tensors stay in reconstruction.pt."""
    report = ReconstructionReport(save_every_n_steps=0, min_image_px=128)
    _fit(tmp_path, lean_trainer_kwargs, [report])
    raw = torch.load(tmp_path / "reconstruction.pt", weights_only=True)
    assert raw["images"].shape == (4, 3, 16, 16)
    png = Image.open(tmp_path / "reconstruction.png")
    assert png.width >= 4 * 128 and png.height >= 2 * 128  # 4 columns, ground truth above reconstruction
    captions = json.loads(png.text["captions"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(captions) == 4
    for cap, p in zip(captions, metrics["per_image"]):
        assert f"true {p['label_true']} | rec {p['label_reconstructed']}" in cap
        assert f"PSNR {p['psnr']:.1f}" in cap and f"SSIM {p['ssim']:.2f}" in cap
    assert "PSNR" in png.text["title"] and "labels 4/4" in png.text["title"]


def test_grid_cells_are_nearest_neighbour_blowups(tmp_path):
    g = torch.Generator().manual_seed(0)
    gt, rec = torch.rand(3, 1, 8, 12, generator=g), torch.rand(3, 1, 8, 12, generator=g)
    path = str(tmp_path / "grid.png")
    layout = write_captioned_grid(path, rec, gt, assignment=[2, 0, 1], captions=["a", "b", "c"], title="t")
    assert layout["scale"] == 11  # 12 px * 11 >= 128
    arr = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float()
    h, w = 8 * 11, 12 * 11
    for i, (x0, y0) in enumerate(layout["origins"]):
        top = arr[y0:y0 + h, x0:x0 + w, 0]
        bottom = arr[y0 + layout["row_offset"]:y0 + layout["row_offset"] + h, x0:x0 + w, 0]
        expect_top = (gt[i, 0] * 255 + 0.5).floor().repeat_interleave(11, 0).repeat_interleave(11, 1)
        expect_bottom = (rec[[2, 0, 1][i], 0] * 255 + 0.5).floor().repeat_interleave(11, 0).repeat_interleave(11, 1)
        assert torch.equal(top, expect_top) and torch.equal(bottom, expect_bottom)
    assert json.loads(Image.open(path).text["captions"]) == ["a", "b", "c"]


def test_saturation_warning_on_a_missing_normalisation(tmp_path, lean_trainer_kwargs, caplog):
    """Issue 14.1, the reported case: the client normalises with mean 0.5 / std 0.25, the attack is given
    no mean/std. The gradients match, but the reconstruction is shown without de-normalising: saturated.
    The report says so and names the cause."""
    from lightning_gi.observation import capture_observation
    from lightning_gi.victim import ObservationFileVictim

    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    image = BundledPhotographs(image_size=16, crops_per_photo=1)[5][0].unsqueeze(0)
    obs = capture_observation(model, (image - 0.5) / 0.25, torch.tensor([2]))  # the client's normalisation
    obs.save(str(tmp_path / "obs.pt"))
    torch.save({"images": image, "labels": torch.tensor([2])}, tmp_path / "gt.pt")
    victim = ObservationFileVictim(model=model, observation_path=str(tmp_path / "obs.pt"),
                                   ground_truth_path=str(tmp_path / "gt.pt"), image_shape=(3, 16, 16))  # no mean/std
    report = ReconstructionReport(save_every_n_steps=0)
    attack = IDLG(seed=0)  # L-BFGS
    with caplog.at_level(logging.INFO):
        pl.Trainer(max_steps=12, callbacks=[report], **lean_trainer_kwargs).fit(attack, victim)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["distance_ratio"] < 1e-3  # the gradients match ...
    assert metrics["saturation"] > 0.5  # ... but the image is clipped
    assert "the gradients match, so the likely cause is a missing or wrong normalisation" in metrics["saturation_warning"]
    assert "WARNING: reconstruction saturated" in caplog.text


def test_unconverged_random_start_is_not_blamed_on_normalisation(tmp_path, lean_trainer_kwargs):
    report = ReconstructionReport(save_every_n_steps=0)
    _fit(tmp_path, lean_trainer_kwargs, [report], steps=2)  # randn start, 2 Adam steps: saturated noise
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["saturation"] > 0.3 and metrics["distance_ratio"] > 0.01
    assert "probably not converged" in metrics["saturation_warning"]


def test_normal_run_has_no_saturation_warning(tmp_path, lean_trainer_kwargs):
    report = ReconstructionReport(save_every_n_steps=0)
    _fit(tmp_path, lean_trainer_kwargs, [report], steps=2, init="rand")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["saturation"] < 0.2 and metrics["saturation_warning"] is None


class _Stop(pl.Callback):
    def __init__(self, at, how):
        self.at, self.how = at, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            if self.how == "sigint":
                raise KeyboardInterrupt
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler turns it into SIGTERMException
            else:
                raise RuntimeError("injected failure")


@pytest.mark.parametrize("how", ["sigint", "sigterm", "error"])
def test_interrupted_run_writes_outputs(tmp_path, lean_trainer_kwargs, how):
    """Issue 16.8: any stop writes the best reconstruction, the grid and metrics marked interrupted."""
    if how == "sigterm" and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None) and not callable(
        signal.getsignal(signal.SIGTERM)
    ):
        pytest.skip("SIGTERM is ignored in this process")
    report = ReconstructionReport(save_every_n_steps=0)
    expected = {"sigint": SystemExit, "sigterm": SystemExit, "error": RuntimeError}[how]
    with pytest.raises(expected):
        _fit(tmp_path, lean_trainer_kwargs, [_Stop(3, how), report], steps=50)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert metrics["steps"] < 50 and metrics["max_steps"] == 50
    assert {"sigint": "KeyboardInterrupt", "sigterm": "SIGTERMException", "error": "injected failure"}[how] in metrics["stop_reason"]
    assert metrics["psnr"] > 0 and metrics["label_accuracy"] == 1.0
    png = Image.open(tmp_path / "reconstruction.png")
    assert png.text["title"].startswith("INTERRUPTED")
    rec = torch.load(tmp_path / "reconstruction.pt", weights_only=True)
    assert torch.isfinite(rec["images"]).all() and rec["step"] == metrics["steps"]


def test_run_without_ground_truth_writes_metrics_and_grid(tmp_path, lean_trainer_kwargs):
    """An observation from elsewhere (no ground truth): metrics.json still records status, distance,
    labels and saturation; the grid shows the reconstructions with their labels."""
    from lightning_gi.observation import capture_observation
    from lightning_gi.victim import ObservationFileVictim

    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    image = BundledPhotographs(image_size=16, crops_per_photo=1)[5][0].unsqueeze(0)
    obs = capture_observation(model, image, torch.tensor([2]))
    path = tmp_path / "obs.pt"
    obs.save(str(path))
    victim = ObservationFileVictim(model=model, observation_path=str(path), image_shape=(3, 16, 16))
    report = ReconstructionReport(save_every_n_steps=0)
    attack = IDLG(optimizer=_adam, seed=0)
    pl.Trainer(max_steps=2, callbacks=[report], **lean_trainer_kwargs).fit(attack, victim)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["recovered_labels"] == [2]
    assert "psnr" not in metrics and 0.0 <= metrics["saturation"] <= 1.0
    png = Image.open(tmp_path / "reconstruction.png")
    assert png.width >= 128 and json.loads(png.text["captions"]) == ["label 2"]


def test_lpips_hint_is_said_once_per_process(tmp_path, lean_trainer_kwargs, caplog):
    from lightning_gi.callbacks import report as report_module

    report_module._NOTES_SHOWN.clear()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            _fit(tmp_path, lean_trainer_kwargs, [ReconstructionReport(save_every_n_steps=0)], steps=1)
    assert caplog.text.count("LPIPS off: to enable it, put alexnet-owt-7be5be79.pth in") == 1


def test_label_strategy_diagnostics_reach_metrics_json(tmp_path, lean_trainer_kwargs):
    """Issue 12: which label rule ran and how well its count equation closed, next to the metrics."""
    from lightning_gi.labels import AutoLabels

    report = ReconstructionReport(save_every_n_steps=0)
    attack = IDLG(optimizer=_adam, label_strategy=AutoLabels(image_size=16), seed=0)
    pl.Trainer(max_steps=2, callbacks=[report], **lean_trainer_kwargs).fit(attack, _victim())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    diagnostics = metrics["label_diagnostics"]
    assert diagnostics["chosen_strategy"] == "ilrg"  # LeNet's head has a bias
    assert diagnostics["counts"] and sum(diagnostics["counts"].values() if isinstance(diagnostics["counts"], dict) else diagnostics["counts"]) == 4
    assert sorted(metrics["recovered_labels"]) == sorted(TRUE_LABELS)


class _WarningLabels(SortedSharedLabels):
    """A label rule that says its labels are not to be trusted (as AutoLabels does on a confident victim)."""

    def recover(self, observation, model):
        self.note(warning="labels unreliable on this victim")
        return super().recover(observation, model)


def test_a_label_rule_warning_reaches_metrics_and_the_summary(tmp_path, lean_trainer_kwargs, caplog):
    report = ReconstructionReport(save_every_n_steps=0)
    attack = IDLG(optimizer=_adam, label_strategy=_WarningLabels(), seed=0)
    with caplog.at_level(logging.INFO):
        pl.Trainer(max_steps=2, callbacks=[report], **lean_trainer_kwargs).fit(attack, _victim())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["label_warning"] == "labels unreliable on this victim"
    assert "WARNING (labels): labels unreliable on this victim" in caplog.text
