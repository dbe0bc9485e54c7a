"""Every config in configs/ parses and runs a couple of steps offline, so none can rot.

Configs of paper recipes that need pretrained files (not downloadable here) must first stop with a clear
one-line error that names the file and checkpoints/README.md; the test then writes a STAND-IN file of the
same architecture with random weights under that name (a torchvision state dict, or a StyleGAN2-ADA pickle
in the official layout) and runs the recipe on it, so the recipe's real loading path is exercised.
"""
import contextlib
import io
import os
import re
from pathlib import Path

import pytest
import yaml

from lightning_gi.checkpoints import MissingCheckpointError
from lightning_gi.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml"))


def _image_side(config: str) -> int:
    data = (yaml.safe_load((ROOT / config).read_text()).get("data") or {}).get("init_args") or {}
    shape = data.get("image_shape") or [3, 32, 32]
    return int(max(shape[1:]))


# ImageNet-size recipes take a minute per step pair on 2 CPU cores: they run in the slow suite.
# So do recipes whose stand-in generator is a full-size StyleGAN2 (256 px and up).
def _is_slow(config: str) -> bool:
    text = (ROOT / config).read_text()
    return _image_side(config) > 64 or any(f"imagenet{r}" in text or f"ffhq{r}" in text for r in (256, 512, 1024))


PARAMS = [pytest.param(c, marks=pytest.mark.slow) if _is_slow(c) else c for c in CONFIGS]


# Datasets that cannot be on a test machine; the config test swaps in the bundled private photographs.
OFFLINE_STAND_IN_DATASETS = {"imagefolder", "imagenet"}


def _short_config(path: Path, tmp_path: Path) -> Path:
    cfg = yaml.safe_load(path.read_text())
    trainer = cfg.setdefault("trainer", {})
    trainer["max_steps"] = 2
    trainer["enable_progress_bar"] = False
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or [] if "ProgressBar" not in c.get("class_path", "")]
    logger = trainer.get("logger")
    if isinstance(logger, dict) and "init_args" in logger:
        logger["init_args"]["save_dir"] = str(tmp_path)
    trainer["default_root_dir"] = str(tmp_path)
    data = (cfg.get("data") or {}).get("init_args") or {}
    source = (data.get("source") or {}).get("init_args") or {}
    if source.get("dataset") in OFFLINE_STAND_IN_DATASETS:  # datasets users place themselves (ImageNet folders)
        source["dataset"] = "photographs"
        source.pop("data_root", None)
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(cfg))
    return out


def _missing_file(message: str) -> str:
    found = re.search(r"file '([^']+)' not found", message)
    assert found, f"no missing file named in: {message}"
    return Path(found.group(1)).name


def write_stand_in(name: str, directory: Path) -> Path:
    """A file named ``name`` with the architecture the recipe expects and random weights."""
    import torch
    import torchvision

    out = directory / name
    if name.endswith(".pkl"):  # a StyleGAN2-ADA pickle in the official layout, from the registry's arguments
        from factories import official_layout_pickle

        from lightning_gi.generators.registry import get_generator_config, list_generators
        from lightning_gi.generators.stylegan2 import StyleGAN2Generator

        (cfg,) = [get_generator_config(g) for g in list_generators() if get_generator_config(g).file == name]
        torch.manual_seed(0)
        official_layout_pickle(out, StyleGAN2Generator(**cfg.kwargs).eval(), marker="stand-in")
        return out
    arch = name.split("-")[0].split(".")[0]  # torchvision's file names: resnet34-b627a593.pth
    assert hasattr(torchvision.models, arch), f"no stand-in recipe for {name}"
    torch.manual_seed(0)
    torch.save(getattr(torchvision.models, arch)().state_dict(), out)
    return out


def test_there_are_configs():
    assert {"configs/idlg_lenet.yaml", "configs/dlg_lenet.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_uses_the_one_victim_with_a_source(config):
    """Issue 13: every recipe names the ONE victim DataModule and says where its data come from in ``source``."""
    data = yaml.safe_load((ROOT / config).read_text())["data"]
    assert data["class_path"] == "lightning_gi.victim.Victim", data["class_path"]
    source = data["init_args"]["source"]
    assert source["class_path"] in ("lightning_gi.victim.DatasetImages", "lightning_gi.victim.ObservationFile")
    for key in ("dataset", "data_root", "batch_size", "batch_seed", "observation_path", "ground_truth_path"):
        assert key not in data["init_args"], f"{config}: data.init_args.{key} belongs in data.init_args.source"


# Recipes whose run needs more memory than a small CI machine has (GiB, measured peak + margin): GIAS with a
# 512 px StyleGAN2 differentiates through the generator twice (19 GB peak measured on CPU).
MEMORY_GIB = {"configs/gias_imagenet64_resnet18.yaml": 28}


def _total_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


@pytest.mark.parametrize("config", PARAMS)
def test_config_parses_and_runs(config, tmp_path):
    if _total_memory_gib() < MEMORY_GIB.get(config, 0):
        pytest.skip(f"{config} needs about {MEMORY_GIB[config]} GiB of memory, this machine has {_total_memory_gib():.0f}")
    short = _short_config(ROOT / config, tmp_path)
    for attempt in range(3):  # a victim whose pretrained file is absent fails while parsing
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(short), "--print_config"])
        if exit_info.value.code in (0, None):
            break
        assert "not found" in err.getvalue() and "checkpoints/README.md" in err.getvalue(), err.getvalue()
        write_stand_in(_missing_file(err.getvalue()), Path(os.environ["LIGHTNING_GI_CHECKPOINTS"]))
    for attempt in range(3):  # each missing pretrained file is reported, then replaced by a stand-in
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                main(["fit", "--config", str(short)])
            break
        except MissingCheckpointError as exc:
            message = str(exc)
        except SystemExit as exc:  # the CLI reports a missing pretrained file in one line, exit status 2
            assert exc.code == 2, err.getvalue()
            message = err.getvalue()
        assert "checkpoints/README.md" in message and len(message.strip().splitlines()) <= 3, message
        write_stand_in(_missing_file(message), Path(os.environ["LIGHTNING_GI_CHECKPOINTS"]))
    else:
        pytest.fail(f"{config} still misses pretrained files after stand-ins were written")
    assert list(tmp_path.rglob("reconstruction.pt")), "the run wrote no reconstruction"
