"""benchmarks/ is a package with ONE JSON envelope: every committed result loads and validates, the writer
flattens rows and writes atomically, and three benchmarks run end to end in ``--smoke`` mode into a temporary
directory (never into the committed benchmarks/results/)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def _common():
    """benchmarks.common of THIS repository (opacus installs an unrelated top-level ``benchmarks`` package)."""
    if str(ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(ROOT))
    import benchmarks.common as common

    assert Path(common.__file__).resolve().parent == ROOT / "benchmarks", common.__file__
    return common


def test_results_exist():
    assert len(RESULT_FILES) >= 10


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_every_committed_result_is_an_envelope(path):
    payload = _common().load_result(path)
    assert list(payload) == ["benchmark", "settings", "environment", "results"]
    assert payload["results"], "a committed result has at least one row"
    assert payload["settings"].get("smoke") is not True, "smoke results must not be committed"
    assert "torch" in payload["environment"] or payload["environment"].get("recorded") is False


def test_load_result_rejects_what_is_not_an_envelope(tmp_path):
    common = _common()
    good = {"benchmark": "b", "settings": {}, "environment": {}, "results": [{"a": 1, "b": [1.0, None], "c": "x"}]}
    cases = {
        "extra_key.json": {**good, "summary": {}},
        "missing_results.json": {k: v for k, v in good.items() if k != "results"},
        "nested_row.json": {**good, "results": [{"a": {"b": 1}}]},
        "list_of_dicts.json": {**good, "results": [{"a": [{"b": 1}]}]},
        "rows_not_list.json": {**good, "results": {"a": 1}},
        "empty_name.json": {**good, "benchmark": ""},
    }
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert common.load_result(tmp_path / "good.json") == good
    for name, payload in cases.items():
        (tmp_path / name).write_text(json.dumps(payload))
        with pytest.raises(ValueError, match=name):
            common.load_result(tmp_path / name)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        common.load_result(tmp_path / "broken.json")


def test_write_result_flattens_rows_and_leaves_no_temporary_file(tmp_path):
    common = _common()
    rows = [{"case": "a", "ratio": {"median": 1.5, "pairs": [1.0, 2.0]}, "lpips": math.nan, "clip": math.inf}]
    path = common.write_result("demo", {"smoke": True, "n": 2}, rows, out=tmp_path, env={"torch": "x"}, quiet=True)
    assert path == tmp_path / "demo.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]
    payload = common.load_result(path)
    assert payload["results"] == [{"case": "a", "ratio.median": 1.5, "ratio.pairs": [1.0, 2.0], "lpips": None, "clip": "inf"}]
    with pytest.raises(ValueError, match="not flat"):
        common.write_result("demo", {}, [{"runs": [{"a": 1}]}], out=tmp_path, quiet=True)
    assert common.load_result(path)["settings"] == {"smoke": True, "n": 2}  # the failed write left the file alone


def test_smoke_results_never_default_to_the_committed_directory(monkeypatch):
    common = _common()
    monkeypatch.delenv(common.RESULTS_ENV, raising=False)
    assert common.results_dir() == common.RESULTS
    assert common.results_dir(smoke=True) != common.RESULTS
    monkeypatch.setenv(common.RESULTS_ENV, "/somewhere")
    assert common.results_dir(smoke=True) == Path("/somewhere")


def _run(argv: list[str], out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(_common().RESULTS_ENV, None)
    proc = subprocess.run([sys.executable, *argv, "--smoke", "--results-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_config_driven_benchmark_smoke(tmp_path):
    """dlg_vs_idlg runs configs/idlg_lenet.yaml and configs/dlg_lenet.yaml through the CLI."""
    _run(["-m", "benchmarks.dlg_vs_idlg"], tmp_path)
    payload = _common().load_result(tmp_path / "dlg_vs_idlg.json")
    assert payload["benchmark"] == "dlg_vs_idlg" and payload["settings"]["smoke"] is True
    cases = [r for r in payload["results"] if r["kind"] == "case"]
    assert sorted(r["attack"] for r in cases) == ["dlg", "idlg"]
    for r in cases:
        assert 0 <= r["mse"] and r["seconds"] > 0 and isinstance(r["label_correct"], bool)
    (summary,) = [r for r in payload["results"] if r["kind"] == "summary"]
    assert 0.0 <= summary["idlg_rule_label_accuracy"] <= 1.0 and summary["idlg.cases"] == 1
    assert payload["settings"]["recipes"]["idlg"] == "configs/idlg_lenet.yaml"


def test_loop_overhead_smoke(tmp_path):
    _run(["-m", "benchmarks.loop_overhead"], tmp_path)
    payload = _common().load_result(tmp_path / "loop_overhead.json")
    assert [r["case"] for r in payload["results"]] == ["lenet32_b1_lbfgs", "lenet32_b1_adam", "resnet18_32_b8_adam"]
    for r in payload["results"]:
        assert r["plain_it_per_s"] > 0 and r["lean_over_plain"] > 0
        assert r["same_iterate_as_plain"] is True  # ours and the plain loop compute the same iterates


def test_script_mode_smoke(tmp_path):
    """``python benchmarks/<name>.py`` still works (the repository's package, not opacus's ``benchmarks``)."""
    _run([str(ROOT / "benchmarks" / "restarts_throughput.py")], tmp_path)
    (row,) = _common().load_result(tmp_path / "restarts_throughput.json")["results"]
    assert row["victim"] == "lenet" and row["restarts"] == 2
    assert row["sequential_s_per_step"] > 0 and row["vectorised_s_per_step"] > 0
    assert row["first_step_distance_max_rel_diff"] < 1e-4  # both restart modes compute the same objective


def test_labels_smoke_and_tables_merge(tmp_path):
    """benchmarks.labels runs end to end; labels_tables merges part files into one envelope and prints the table."""
    _run(["-m", "benchmarks.labels"], tmp_path)
    part = tmp_path / "labels.json"
    rows = _common().load_result(part)["results"]
    assert {r["strategy"] for r in rows} == {"ilrg", "llg"}
    ilrg = next(r for r in rows if r["strategy"] == "ilrg")
    assert ilrg["exact"] == 1.0 and ilrg["labels_off"] == 0.0  # untrained LeNet, batch 8 of 3 classes
    rerun = tmp_path / "rerun.json"  # a re-run of one strategy replaces its rows
    payload = json.loads(part.read_text())
    payload["results"] = [{**r, "labels_off": 9.5, "exact": 0.0} for r in payload["results"] if r["strategy"] == "llg"]
    rerun.write_text(json.dumps(payload))
    merged = tmp_path / "merged.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.labels_tables", str(part), str(rerun), "--merge", str(merged)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    merged_rows = _common().load_result(merged)["results"]
    assert len(merged_rows) == len(rows)
    assert {r["labels_off"] for r in merged_rows if r["strategy"] == "llg"} == {9.5}
    assert "| ilrg | 100% / 0.0 |" in out and "| llg | 0% / 9.5 |" in out and "**lenet32, untrained**" in out
