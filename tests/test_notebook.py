"""The quickstart notebook runs offline, end to end, so it cannot rot."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "iDLG label [2]" in outputs
    psnr = float(outputs.split("iDLG label [2] PSNR ")[1].split(" dB")[0])
    assert psnr > 20.0, outputs
    ig_psnr = float(outputs.split("IG label [2] PSNR ")[1].split(" dB")[0])
    assert ig_psnr > 20.0, outputs  # section 3 must show the photograph, not noise
    assert (tmp_path / "quickstart_observation.pt").exists()
    assert os.path.getsize(tmp_path / "quickstart_observation.pt") > 0
