"""ReconstructionMonitor: scalars through any Lightning logger, final state at the end, curated hparams."""
import csv
import json

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_gi.attacks import IDLG
from lightning_gi.callbacks import ReconstructionMonitor, ReconstructionReport
from lightning_gi.victim import LeNet, TensorBatchVictim
from lightning_gi.victim.data import BundledPhotographs


def _adam(p):
    return torch.optim.Adam(p, lr=0.05)


def _victim():
    torch.manual_seed(0)
    data = BundledPhotographs(image_size=16, crops_per_photo=1)
    images = torch.stack([data[i][0] for i in range(2)])
    return TensorBatchVictim(LeNet(num_classes=10, image_size=16), images, torch.tensor([3, 5]), share_labels=True)


def _trainer(logger, callbacks, steps, tmp_path):
    return pl.Trainer(
        max_steps=steps, logger=logger, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1, log_every_n_steps=1,
    )


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_csv_logger_gets_the_monitor_scalars_and_the_final_state(tmp_path):
    """Issue 14.11: the monitor goes through the logger API; a run shorter than every_n_steps (7 < 25)
    still logs its final state; the final figures are hparams metrics; the hparams are the attack's and
    the victim's, not the trainer's internals."""
    logger = CSVLogger(str(tmp_path), name="csv")
    callbacks = [ReconstructionMonitor(every_n_steps=25), ReconstructionReport(save_every_n_steps=0)]
    trainer = _trainer(logger, callbacks, 7, tmp_path)
    trainer.fit(IDLG(optimizer=_adam, seed=0), _victim())
    rows = _rows(f"{logger.log_dir}/metrics.csv")
    columns = set(rows[0])
    assert {"quality/psnr", "quality/ssim", "best_matching_distance", "lr/optimizer_0"} <= columns
    psnr_steps = [int(r["step"]) for r in rows if r["quality/psnr"]]
    assert psnr_steps == [0, 7]  # the start and the final state (7 < every_n_steps)
    final = json.loads((tmp_path / "csv" / "version_0" / "metrics.json").read_text())
    hp_rows = [r for r in rows if r.get("hp/psnr")]
    assert float(hp_rows[-1]["hp/psnr"]) == pytest.approx(final["psnr"])
    assert float(hp_rows[-1]["hp/label_accuracy"]) == final["label_accuracy"] == 1.0
    assert float(hp_rows[-1]["hp/matching_distance"]) == pytest.approx(final["matching_distance"])
    hparams = yaml.safe_load(open(f"{logger.log_dir}/hparams.yaml"))
    assert hparams["attack"] == "IDLG" and hparams["victim"] == "TensorBatchVictim"
    assert hparams["attack/seed"] == 0 and hparams["victim/model"] == "LeNet"
    assert not any(k.startswith("trainer") for k in hparams) and len(hparams) < 30


def test_tensorboard_hparams_metrics_labels_and_images(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import plugin_data_pb2

    logger = TensorBoardLogger(str(tmp_path), name="tb")  # default_hp_metric=True, as the shipped configs
    callbacks = [ReconstructionMonitor(every_n_steps=25), ReconstructionReport(save_every_n_steps=0)]
    _trainer(logger, callbacks, 4, tmp_path).fit(IDLG(optimizer=_adam, seed=0), _victim())
    acc = ea.EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert {m.name.tag for m in experiment.metric_infos} == {
        "hp/psnr", "hp/ssim", "hp/lpips", "hp/label_accuracy", "hp/matching_distance"}
    assert all(k in ("attack", "victim", "max_steps") or k.startswith(("attack/", "victim/")) for k in session.hparams)
    final = json.loads((tmp_path / "tb" / "version_0" / "metrics.json").read_text())
    assert acc.Scalars("hp/psnr")[-1].value == pytest.approx(final["psnr"], rel=1e-5)
    assert [e.step for e in acc.Scalars("quality/psnr")] == [0, 4]
    assert "hp_metric" not in acc.Tags()["scalars"]
    assert "reconstruction" in acc.Tags()["images"]
    texts = {t for t in acc.Tags()["tensors"]}
    assert any(t.startswith("labels") for t in texts) and any(t.startswith("recovered_labels") for t in texts)
    assert any(t.startswith("labels/diagnostics") for t in texts), texts  # the label rule's evidence (issue 12)


def test_monitor_tolerates_non_finite_unknowns(tmp_path):
    """Issue 16.11: NaN unknowns (e.g. from a checkpoint) must not crash the monitor (the guard handles them)."""
    logger = CSVLogger(str(tmp_path), name="csv")
    attack = IDLG(optimizer=_adam, seed=0)
    monitor = ReconstructionMonitor(every_n_steps=1)
    trainer = _trainer(logger, [monitor], 1, tmp_path)
    trainer.fit(attack, _victim())
    with torch.no_grad():
        attack.dummy_images.fill_(float("nan"))
    with pytest.warns(UserWarning, match="not finite"):
        monitor._log(trainer, attack)
