"""benchmarks/gpu_suite.sh --smoke: the GPU suite runs end to end on a CPU with tiny sizes and writes its JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke_writes_every_case(tmp_path):
    out = tmp_path / "speed_smoke.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert set(payload) == {"benchmark", "settings", "environment", "results"}
    assert payload["settings"]["smoke"] is True and payload["environment"]["device"] == "cpu"
    rows = payload["results"]  # one flat row per (case, variant)
    assert {r["case"] for r in rows} == {"sync_free_step", "ig_resnet18_32_b1", "ig_resnet18_32_b8", "stepwise_resnet34_32_b8",
                                         "restarts_r8_resnet18_32", "gias_stylegan2_32"}
    for r in rows:
        if r["case"] != "sync_free_step":
            assert r["ms_per_step"] > 0
    (sync,) = [r for r in rows if r["case"] == "sync_free_step"]
    assert sync["steps_counted"] >= 2 and sync["meets_bar"] is True
    assert {r["auto_chose"] for r in rows if r["case"] == "restarts_r8_resnet18_32"} == {"sequential"}  # CPU
    # ours and the plain loop start from the same dummies and run the same Inverting Gradients math
    (ours,) = [r for r in rows if r["case"] == "ig_resnet18_32_b1" and r["variant"] == "ours_eager"]
    diff = ours["max_abs_diff_final_dummies_vs_plain"]
    assert diff is not None and diff < 1e-3

def test_gpu_suite_script_rejects_nothing_it_documents():
    """The script's usage lines name only options speed.py accepts (a cheap guard, no run)."""
    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    assert "--smoke" in text and "-m benchmarks.speed --suite gpu" in text
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--help"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert proc.returncode == 0
    for flag in ("--suite", "--smoke", "--compile", "--pairs", "--cases", "--out", "--device", "--scale", "--results-dir"):
        assert flag in proc.stdout


def test_warm_up_batches_are_untimed_but_the_run_is_unchanged():
    """benchmarks.speed.our_loop(warmup=k): the first k batches are not timed (a compile falls there), the run
    itself is the same, so its final dummies still equal the plain loop's; the timed window counts optimiser steps."""
    import torch

    from benchmarks.speed import l2_match, lenet_victim, our_loop, plain_loop, target_gradients
    from lightning_gi.attacks import ImagePriorAttack
    from lightning_gi.labels import SharedLabels
    from lightning_gi.objectives import SquaredL2Distance

    device = torch.device("cpu")
    model, images, labels = lenet_victim(16, device)
    targets = target_gradients(model, images, labels)
    adam = lambda p: torch.optim.Adam(p, lr=0.1)  # noqa: E731
    init = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    _, plain = plain_loop(model, labels, targets, init, 12, adam, l2_match)
    for warmup, k in ((0, 1), (2, 1), (1, 4)):
        attack = ImagePriorAttack(optimizer=adam, seed=0, label_strategy=SharedLabels(), distance=SquaredL2Distance(),
                                  priors=[], steps_per_call=k)
        seconds, dummies, _ = our_loop(attack, model, images, labels, 12, device, warmup=warmup)
        assert seconds > 0
        torch.testing.assert_close(dummies, plain, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="nothing to time"):
        our_loop(ImagePriorAttack(optimizer=adam, seed=0, label_strategy=SharedLabels(), priors=[], steps_per_call=4),
                 model, images, labels, 8, device, warmup=2)


@pytest.mark.slow
def test_first_step_suite_times_both_processes(tmp_path):
    """--suite first-step: make demo's time to its first training_step and the plain script's, in one envelope."""
    out = tmp_path / "first.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--suite", "first-step", "--pairs", "1", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["case"] == "first_step_make_demo" and row["plain_seconds"] > 0 and row["seconds"] > 0
    assert row["ratio_vs_plain.median"] == pytest.approx(row["seconds"] / row["plain_seconds"])
