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
    assert {r["case"] for r in rows} == {"ig_resnet18_32_b1", "ig_resnet18_32_b8", "stepwise_resnet34_32_b8", "restarts_r8_resnet18_32", "gias_stylegan2_32"}
    for r in rows:
        assert r["ms_per_step"] > 0
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
