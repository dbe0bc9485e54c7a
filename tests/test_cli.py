"""LightningCLI: configs parse, round-trip through --print_config, and a short run writes every output."""
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_gi.cli import main

ROOT = Path(__file__).resolve().parents[1]
FOUNDATION_CONFIGS = ["configs/idlg_lenet.yaml", "configs/dlg_lenet.yaml"]


def _run(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return out.getvalue()


def test_help_lists_the_subcommand_options():
    with pytest.raises(SystemExit) as exit_info:
        _run(["fit", "--help"])
    assert exit_info.value.code == 0


def test_top_level_help_lists_only_working_commands_and_is_fast():
    """`lightning-gi --help` lists `fit` only (no `validate`) and imports neither torch nor Lightning."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "lightning-gi"
    probe = (
        "import sys; from lightning_gi.cli import main; main(['--help']); "
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'torchvision', 'scipy', 'matplotlib') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "fit" in proc.stdout and "validate" not in proc.stdout
    proc = subprocess.run([str(script), "validate"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown command 'validate'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def test_the_parser_offers_only_fit():
    from lightning_gi.cli import _cli_class

    assert set(_cli_class()[0].subcommands()) == {"fit"}


def test_known_noise_is_filtered():
    """Lightning 2.6's eval-mode wording and the hardware/tip info lines never reach the user."""
    import logging
    import warnings

    from lightning_gi.cli import configure_output

    configure_output()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("Found 65 module(s) in eval mode at the start of training. This may lead to unexpected "
                      "behavior during training.", UserWarning)
    assert not caught
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
        log.info("GPU available: False, used: False")
        log.info("TPU available: False, using: 0 TPU cores")
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        log.info("the end-of-run summary")
    assert out.getvalue().strip() == "the end-of-run summary"


_MY_PACKAGE = """
import torch
from torch import nn


class MyNet(nn.Module):
    \"\"\"A user's own model (not one of lightning_gi's demo victims, so its normalisation must be stated).\"\"\"

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=2, padding=2)
        self.fc = nn.Linear(4 * 16 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))
"""


def test_readme_own_model_snippet_runs_as_written(tmp_path, monkeypatch):
    """README's own-model config is complete: with `my_package.MyNet` a real user model (not a demo victim,
    so the snippet must state the normalisation, issue 14.1) and the files written, it runs as is."""
    from lightning_gi.observation import capture_observation

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Attacking your own model"):]
    snippet = section[section.index("```yaml") + len("```yaml"):]
    snippet = snippet[: snippet.index("```")]
    (tmp_path / "my_package").mkdir()
    (tmp_path / "my_package" / "__init__.py").write_text(_MY_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import my_package

    importlib.reload(my_package)
    torch.manual_seed(0)
    model = my_package.MyNet(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "victim.pt")
    image = torch.rand(1, 3, 32, 32)
    capture_observation(model, (image - 0.5) / 0.5, torch.tensor([3])).save(tmp_path / "observation.pt")
    (tmp_path / "my_attack.yaml").write_text(snippet)
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        _run(["fit", "--config", "my_attack.yaml", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"])
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "reconstruction.pt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("config", FOUNDATION_CONFIGS)
def test_print_config_round_trip(tmp_path, config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / config), "--print_config"])
    cfg = yaml.safe_load(out.getvalue())
    source = yaml.safe_load((ROOT / config).read_text())
    assert cfg["model"]["class_path"] == source["model"]["class_path"]
    assert cfg["data"]["init_args"]["model"]["class_path"] == "lightning_gi.victim.LeNet"
    assert cfg["trainer"]["max_steps"] == source["trainer"]["max_steps"]
    # the printed config is itself a valid config
    (tmp_path / "printed.yaml").write_text(out.getvalue())
    out2 = io.StringIO()
    with contextlib.redirect_stdout(out2), pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert yaml.safe_load(out2.getvalue()) == cfg


@pytest.mark.parametrize("config", FOUNDATION_CONFIGS)
def test_short_run_writes_outputs(tmp_path, config):
    cfg = yaml.safe_load((ROOT / config).read_text())
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ProgressBar" not in c["class_path"]]
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ReconstructionMonitor"):
            cb["init_args"]["every_n_steps"] = 2
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(cfg))
    log = _run(
        [
            "fit",
            "--config", str(tmp_path / "short.yaml"),
            "--trainer.max_steps=4",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    run_dirs = list(tmp_path.glob("*/version_0"))
    assert len(run_dirs) == 1, log
    run = run_dirs[0]
    assert f"log_dir: {run}" in log
    rec = torch.load(run / "reconstruction.pt", weights_only=True)
    assert rec["images"].shape == (1, 3, 32, 32) and rec["images"].dtype == torch.float32
    assert 0.0 <= float(rec["images"].min()) and float(rec["images"].max()) <= 1.0
    assert rec["labels"].dtype == torch.long and rec["labels"].shape == (1,)
    assert (run / "reconstruction.png").stat().st_size > 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("mse", "psnr", "ssim", "lpips", "label_accuracy", "per_image", "assignment"):
        assert key in metrics
    assert metrics["lpips"] is None and "alexnet-owt-7be5be79.pth" in metrics["lpips_note"]
    assert len(metrics["per_image"]) == 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "matching_distance" in acc.Tags()["scalars"]
    assert "quality/psnr" in acc.Tags()["scalars"]
    assert len(acc.Images("reconstruction")) >= 2


def test_unknown_config_key_is_rejected(tmp_path):
    bad = yaml.safe_load((ROOT / "configs/idlg_lenet.yaml").read_text())
    bad["model"]["init_args"]["learning_rate"] = 0.1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "bad.yaml")])
    assert exit_info.value.code != 0
    assert "learning_rate" in err.getvalue()


def test_missing_weights_file_names_the_file_and_the_page(tmp_path):
    from lightning_gi.checkpoints import MissingCheckpointError
    from lightning_gi.victim.models import torchvision_classifier

    with pytest.raises(MissingCheckpointError, match=r"resnet18-f37072fd.pth.*checkpoints/README.md"):
        torchvision_classifier("resnet18", weights_path="resnet18-f37072fd.pth")


def test_console_script_exits_zero(tmp_path):
    """`lightning-gi fit` as a user runs it: exit status 0 and the log_dir line at the end."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "lightning-gi"
    proc = subprocess.run(
        [str(script), "fit", "--config", str(ROOT / "configs/idlg_lenet.yaml"), "--trainer.max_steps=1",
         "--trainer.callbacks=[]", f"--trainer.logger.init_args.save_dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"log_dir: {tmp_path}/idlg_lenet/version_0"
    # one stream for the results, and none of Lightning's hardware probes or advertising tips
    both = proc.stdout + proc.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "litlogger", "litmodels", "in eval mode"):
        assert noise not in both, both[-3000:]
    repeated = {line for line in proc.stdout.splitlines() if line.strip()} & set(proc.stderr.splitlines())
    assert not repeated, repeated  # the end-of-run summary is printed once, on stdout with the log_dir line
    assert (tmp_path / "idlg_lenet" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_tools_are_subcommands_of_the_one_cli():
    """Issue 13.5 / 14.6: giml, aux-stats and train-dcgan run as `lightning-gi <tool>` (one flag style), are
    listed by `lightning-gi --help`, and GIML's config parses without the old `fit` word."""
    from lightning_gi.cli import TOOLS

    top = _run(["--help"])
    for tool in ("giml", "aux-stats", "train-dcgan", "public-images"):
        assert tool in TOOLS and f"lightning-gi {tool}" in top
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
            main([tool, "--help"])
        assert info.value.code == 0, err.getvalue()
        assert f"lightning-gi {tool}" in out.getvalue()  # usage names the command the user typed
    for argv in (["giml", "--config", "configs/giml/dcgan_photos.yaml"],
                 ["giml", "fit", "--config", "configs/giml/dcgan_photos.yaml"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
            main([argv[0], *[str(ROOT / a) if a.endswith(".yaml") else a for a in argv[1:]], "--print_config"])
        assert info.value.code == 0 and yaml.safe_load(out.getvalue())["model"]["latent_steps"] > 0


def test_a_tool_refuses_an_unknown_flag_with_exit_2():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as info:
        main(["aux-stats", "--out", "unused.pt", "--no-such-flag"])
    assert info.value.code == 2 and "--no-such-flag" in err.getvalue()
