"""Reconstruction metrics: assignment, PSNR/SSIM/MSE, label accuracies and offline LPIPS loading."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_gi import checkpoints as ckpt
from lightning_gi.checkpoints import CorruptCheckpointError
from lightning_gi.metrics import (
    LPIPS_BACKBONE_FILES,
    ReconstructionQuality,
    load_lpips,
    lpips_unavailable_reason,
    match_reconstructions,
    reconstruction_metrics,
    saturated_fraction,
    saturation_warning,
    ssim_kernel_size,
    ssim_sigma,
)

ALEX_FILE = "alexnet-owt-7be5be79.pth"


def _images(n: int = 6, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g)


@pytest.fixture
def isolated_checkpoints(tmp_path, monkeypatch) -> Path:
    """Only an empty tmp dir (and an empty torch hub) is searched for pretrained files."""
    ck_dir, torch_home, cwd = tmp_path / "ckpts", tmp_path / "torch_home", tmp_path / "cwd"
    for d in (ck_dir, torch_home, cwd):
        d.mkdir()
    monkeypatch.setenv("LIGHTNING_GI_CHECKPOINTS", str(ck_dir))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.chdir(cwd)
    # The source tree's checkpoints/ may hold real weights on a developer machine: leave it out.
    original = ckpt.checkpoint_dirs
    monkeypatch.setattr(ckpt, "checkpoint_dirs", lambda: [d for d in original() if tmp_path in d.parents])
    return ck_dir


@pytest.fixture(scope="module")
def alexnet_state() -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.alexnet().state_dict()


# ---------------------------------------------------------------------------------------------- assignment
def test_assignment_recovers_known_permutation():
    gt = _images(8)
    true_perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    # reconstructions are a shuffled, slightly noisy copy: rec[true_perm[i]] ~ gt[i]
    rec = torch.empty_like(gt)
    rec[true_perm] = gt
    rec = (rec + 0.01 * torch.randn(rec.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    perm = match_reconstructions(rec, gt)
    assert perm.dtype == torch.long and perm.shape == (8,)
    assert torch.equal(perm, true_perm)
    assert not torch.equal(true_perm, torch.arange(8))  # the test really shuffles
    report = reconstruction_metrics(rec, gt)
    assert report["assignment"] == true_perm.tolist()
    assert report["mse"] < 1e-3


def test_more_reconstructions_than_ground_truth_and_shape_errors():
    gt = _images(3)
    rec = torch.cat([_images(2, seed=5), gt[[2, 0, 1]]])
    assert match_reconstructions(rec, gt).tolist() == [3, 4, 2]
    with pytest.raises(ValueError, match=r"\(3, 3, 16, 16\).*\(3, 3, 8, 8\)"):
        match_reconstructions(_images(3), _images(3, h=8, w=8))
    with pytest.raises(ValueError):
        match_reconstructions(_images(2), _images(3))


# ---------------------------------------------------------------------------------------------- scores
def test_psnr_matches_mse_on_hand_made_case():
    gt = torch.full((1, 3, 16, 16), 0.5)
    rec = gt.clone()
    rec[..., :8, :] += 0.1  # half the pixels off by 0.1 -> MSE = 0.005
    report = reconstruction_metrics(rec, gt)
    assert report["mse"] == pytest.approx(0.005, rel=1e-5)
    assert report["psnr"] == pytest.approx(10 * math.log10(1 / 0.005), rel=1e-5)
    assert report["per_image"][0]["psnr"] == pytest.approx(report["psnr"])


def test_identical_images_are_perfect_and_report_is_json():
    gt = _images(4)
    report = reconstruction_metrics(gt.clone(), gt)
    assert report["mse"] == 0.0
    assert report["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert all(p["ssim"] == pytest.approx(1.0, abs=1e-5) for p in report["per_image"])
    assert report["assignment"] == [0, 1, 2, 3]
    assert report["num_images"] == 4
    assert report["lpips"] is None and isinstance(report["lpips_note"], str)
    assert report["label_accuracy"] is None and report["label_multiset_accuracy"] is None
    assert report["labels_off"] is None and report["label_accuracy_paired"] is None
    json.dumps(report)
    assert set(report) == {
        "mse", "psnr", "ssim", "lpips", "lpips_note", "label_accuracy", "labels_off", "label_accuracy_paired",
        "label_multiset_accuracy", "saturation", "saturation_warning", "assignment", "num_images", "per_image",
    }


def test_inputs_are_clamped():
    gt = _images(2)
    report = reconstruction_metrics(gt + 5.0 * (gt > 0.999), gt)  # out-of-range only where gt ~ 1
    assert report["mse"] < 1e-6


def test_headline_label_accuracy_is_the_multiset_one():
    """Issue 14.2: recovered [3,4,6,7] vs true [6,7,4,3] is a perfect label recovery (headline 1.0, 0 off),
    whatever the image pairing; the per-image pairing figure is kept under its own name."""
    gt = _images(4)
    rec = gt[[2, 0, 3, 1]].clone()  # rec[0] is gt[2], rec[1] is gt[0], ...: assignment [1, 3, 0, 2]
    true_labels = torch.tensor([6, 7, 4, 3])
    rec_labels = torch.tensor([3, 4, 6, 7])
    report = reconstruction_metrics(rec, gt, rec_labels, true_labels)
    assert report["assignment"] == [1, 3, 0, 2]
    assert report["label_accuracy"] == 1.0 and report["labels_off"] == 0
    assert report["label_multiset_accuracy"] == 1.0
    # labels attached to gt[0..3] by the image pairing: rec_labels[[1, 3, 0, 2]] = [4, 7, 3, 6]
    assert [p["label_reconstructed"] for p in report["per_image"]] == [4, 7, 3, 6]
    assert report["label_accuracy_paired"] == 0.25
    # a partial multiset match: one label wrong
    report = reconstruction_metrics(rec, gt, torch.tensor([3, 4, 6, 6]), true_labels)
    assert report["label_accuracy"] == pytest.approx(3 / 4) and report["labels_off"] == 1


def test_saturation_warning_fires_on_unnormalised_reconstruction():
    """Issue 14.1: a client normalising with mean 0.5 / std 0.25 but an attack without mean/std maps the
    recovered input x to x (not 0.25 x + 0.5): most pixels fall outside [0, 1] and are clipped."""
    gt = _images(4, h=32, w=32)
    normalised = (gt - 0.5) / 0.25  # what the victim saw, recovered perfectly
    unnormalised = normalised.clamp(0, 1)  # shown without de-normalising: mostly 0 or 1
    report = reconstruction_metrics(unnormalised, gt)
    assert report["saturation"] > 0.5
    assert "normalisation" in report["saturation_warning"] and "mean/std" in report["saturation_warning"]
    converged = reconstruction_metrics(unnormalised, gt, distance_ratio=1e-6)["saturation_warning"]
    assert "the gradients match, so the likely cause is a missing or wrong normalisation" in converged
    assert "not converged" in reconstruction_metrics(unnormalised, gt, distance_ratio=0.5)["saturation_warning"]
    good = reconstruction_metrics((gt + 0.02).clamp(0, 1), gt)
    assert good["saturation"] < 0.1 and good["saturation_warning"] is None
    # a ground truth that is itself mostly black (MNIST-like) does not trigger it
    dark = torch.zeros(2, 1, 16, 16)
    dark[..., 4:8, 4:8] = 0.7
    assert reconstruction_metrics(dark.clone(), dark)["saturation_warning"] is None
    assert saturation_warning(unnormalised) is not None and saturation_warning(gt) is None
    assert saturated_fraction(torch.tensor([0.0, 1.0, 0.5, 0.3])) == 0.5


def test_small_images_use_small_ssim_kernel():
    assert ssim_kernel_size(8, 8) == 7
    assert ssim_kernel_size(32, 32) == 11
    assert ssim_kernel_size(8, 5) == 5
    assert ssim_kernel_size(2, 2) == 1
    assert ssim_sigma(11) == 1.5
    for k in range(1, 12, 2):  # torchmetrics derives the Gaussian window from sigma alone
        assert int(3.5 * ssim_sigma(k) + 0.5) * 2 + 1 == k
    # 4x4 would fail with the standard 11-wide window (reflection padding of 5 > 4 pixels)
    tiny = _images(2, h=4, w=4)
    assert reconstruction_metrics(tiny.clone(), tiny)["ssim"] == pytest.approx(1.0, abs=1e-5)
    flat = torch.ones(1, 1, 4, 4)  # flat identical images: exactly 1 (no float32 variance drift)
    assert reconstruction_metrics(flat, flat.clone())["ssim"] == pytest.approx(1.0, abs=1e-9)
    gt = _images(3, c=1, h=8, w=8)
    noisy = (gt + 0.05 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    perfect = reconstruction_metrics(gt.clone(), gt)
    report = reconstruction_metrics(noisy, gt)
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < report["ssim"] < 1.0
    assert math.isfinite(report["psnr"])


def test_reconstruction_quality_metric_accumulates():
    metric = ReconstructionQuality()
    gt1, gt2 = _images(4, seed=1), _images(2, seed=2)
    rec1 = (gt1 + 0.1).clamp(0, 1)[[3, 1, 0, 2]]
    rec2 = (gt2 - 0.05).clamp(0, 1)
    metric.update(rec1, gt1)
    metric.update(rec2, gt2)
    out = metric.compute()
    r1, r2 = reconstruction_metrics(rec1, gt1), reconstruction_metrics(rec2, gt2)
    for key in ("mse", "psnr", "ssim"):
        expected = (r1[key] * 4 + r2[key] * 2) / 6
        assert out[key].item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- LPIPS
def test_lpips_missing_backbone_returns_none_with_reason(isolated_checkpoints):
    assert load_lpips("alex") is None
    reason = lpips_unavailable_reason("alex")
    # issue 14.12: one short line that names the file and torchvision's own cache directory
    assert ALEX_FILE in reason and str(Path(torch.hub.get_dir()) / "checkpoints") in reason
    assert "\n" not in reason and len(reason.replace(str(torch.hub.get_dir()), "")) < 120
    assert LPIPS_BACKBONE_FILES["vgg"] in lpips_unavailable_reason("vgg")
    report = reconstruction_metrics(_images(2), _images(2), lpips_model=None, lpips_note=reason)
    assert report["lpips"] is None and report["lpips_note"] == reason


def test_lpips_loads_local_backbone(isolated_checkpoints, alexnet_state):
    torch.save(alexnet_state, isolated_checkpoints / ALEX_FILE)
    assert lpips_unavailable_reason("alex") == ""
    model = load_lpips("alex")
    assert model is not None and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.equal(model.net.slice1[0].weight, alexnet_state["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").weight, alexnet_state["features.10.weight"])

    gt = _images(2, h=64, w=64, seed=7)
    other = _images(2, h=64, w=64, seed=8)
    same = reconstruction_metrics(gt.clone(), gt, lpips_model=model)
    diff = reconstruction_metrics(other, gt, lpips_model=model)
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert diff["lpips"] > 1e-4
    assert same["lpips_note"] is None
    assert all(p["lpips"] is not None for p in diff["per_image"])
    json.dumps(diff)


def test_lpips_truncated_or_mismatched_file_raises(isolated_checkpoints, alexnet_state, tmp_path):
    full = tmp_path / "full.pth"
    torch.save(alexnet_state, full)
    data = full.read_bytes()
    (isolated_checkpoints / ALEX_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError):
        load_lpips("alex")

    wrong = {k: v for k, v in alexnet_state.items() if k.startswith("features.")}
    wrong["features.3.weight"] = torch.zeros(8, 8, 3, 3)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save(wrong, bad_shape)
    with pytest.raises(CorruptCheckpointError, match="features.3.weight|slice2.3.weight"):
        load_lpips("alex", backbone_path=bad_shape)


def test_lpips_backbone_in_torchvision_cache_is_used(isolated_checkpoints, alexnet_state, tmp_path):
    """Issue 14.12: the file where torchvision itself looks ($TORCH_HOME/hub/checkpoints) enables LPIPS."""
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    assert ALEX_FILE in lpips_unavailable_reason("alex")
    torch.save(alexnet_state, hub / ALEX_FILE)  # random AlexNet weights in torchvision's format
    assert lpips_unavailable_reason("alex") == ""
    model = load_lpips("alex")
    assert model is not None
    gt = _images(2, h=64, w=64, seed=7)
    report = reconstruction_metrics(_images(2, h=64, w=64, seed=8), gt, lpips_model=model)
    assert report["lpips"] is not None and report["lpips"] > 0 and report["lpips_note"] is None
