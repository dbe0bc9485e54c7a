"""The CLI's progress bar labels the attack's one endless epoch by its steps, not "Epoch 0/-2"."""
from pathlib import Path

from factories import run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_cli_progress_bar_does_not_print_a_negative_epoch_count(tmp_path):
    code, out, err = run_cli([
        "fit", "--config", str(ROOT / "configs/idlg_lenet.yaml"), "--trainer.max_steps=2",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ])
    assert code == 0, err
    assert "/-2" not in out + err
    assert "Attack" in out + err
