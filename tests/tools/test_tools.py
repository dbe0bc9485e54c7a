"""The tools as `lightning-gi` subcommands (issue 13.5): one flag style (jsonargparse, as `fit`), `--config`,
typed `--help`, one-sentence errors with exit status 2; tiny settings so that each run takes seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from factories import run_cli

ROOT = Path(__file__).resolve().parents[2]

AUX_TINY = ["--model", "resnet18", "--num_classes", "20", "--model_seed", "0", "--image_size", "32", "--count", "6", "--positions", "4"]


def _giml_config(tmp_path: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "model": {"generator": "dcgan32", "generator_kwargs": {"z_dim": 8, "ngf": 4}, "latent_steps": 1, "adapt_steps": 1,
                  "generator_out": str(tmp_path / "giml.pt")},
        "data": {"model": {"class_path": "lightning_gi.victim.LeNet", "init_args": {"num_classes": 14}},
                 "image_shape": [3, 32, 32], "batch_size": 2, "num_tasks": 2},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)},
    }
    path = tmp_path / "giml_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------- aux-stats
def test_aux_stats_writes_statistics_and_accepts_the_older_flag_spellings(tmp_path):
    from lightning_gi.labels import load_auxiliary_stats

    code, out, err = run_cli(["aux-stats", *AUX_TINY, "--out", str(tmp_path / "snake.pt")])
    assert code == 0, err
    stats = load_auxiliary_stats(tmp_path / "snake.pt")
    assert stats.positions.numel() == 4 and stats.num_images == 6 and stats.feature_dim == 512
    assert "wrote" in out
    kebab = [a.replace("_", "-") if a.startswith("--") else a for a in AUX_TINY]
    assert "--num-classes" in kebab
    code, _, err = run_cli(["aux-stats", *kebab, "--out", str(tmp_path / "kebab.pt")])
    assert code == 0, err
    assert torch.equal(load_auxiliary_stats(tmp_path / "kebab.pt").positions, stats.positions)


def test_aux_stats_reads_its_options_from_a_config_file(tmp_path):
    from lightning_gi.labels import load_auxiliary_stats

    config = tmp_path / "aux.yaml"
    config.write_text(yaml.safe_dump({"model": "resnet18", "num_classes": 20, "model_seed": 0, "image_size": 32,
                                      "count": 5, "positions": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                      "out": str(tmp_path / "from_config.pt")}))
    code, _, err = run_cli(["aux-stats", "--config", str(config)])
    assert code == 0, err
    stats = load_auxiliary_stats(tmp_path / "from_config.pt")
    assert stats.positions.numel() == 3 and stats.num_images == 5


# ---------------------------------------------------------------------------------------------- train-dcgan
def test_train_dcgan_default_output_is_where_gias_finds_it(tmp_path, monkeypatch):
    from lightning_gi.generators import create_generator

    monkeypatch.setenv("LIGHTNING_GI_CHECKPOINTS", str(tmp_path))
    code, out, err = run_cli(["train-dcgan", "--dataset", "digits", "--steps", "2", "--ngf", "4", "--batch-size", "8"])
    assert code == 0, err
    assert (tmp_path / "dcgan_digits32.pt").is_file() and "step 2/2" in err
    g = create_generator("dcgan_digits32", pretrained=True)  # found by the registry's own lookup
    assert g.ngf == 4 and Path(g.checkpoint_file).resolve() == (tmp_path / "dcgan_digits32.pt").resolve()


# ---------------------------------------------------------------------------------------------- giml
def test_giml_runs_from_a_config_and_writes_a_generator_gias_can_load(tmp_path):
    from lightning_gi.generators import create_generator

    code, _, err = run_cli(["giml", "--config", str(_giml_config(tmp_path))])
    assert code == 0, err
    g = create_generator("dcgan_giml32", checkpoint_path=str(tmp_path / "giml.pt"))
    assert g.z_dim == 8 and g(torch.randn(2, 8)).shape == (2, 3, 32, 32)


def test_giml_config_names_the_tasks_datamodule_where_it_lives():
    from lightning_gi.attacks import giml
    from lightning_gi.victim import GradientTasks, tasks

    assert GradientTasks is tasks.GradientTasks is giml.GradientTasks
    code, out, err = run_cli(["giml", "--config", str(ROOT / "configs/giml/dcgan_photos.yaml"), "--print_config"])
    assert code == 0, err
    assert yaml.safe_load(out)["data"]["victim_mode"] == "sgd_every"


# ---------------------------------------------------------------------------------------------- help and errors
@pytest.mark.parametrize(
    "tool,expected",
    [
        ("aux-stats", ["--num_classes", "type: int", "--source", "Literal['public', 'photographs', 'textures']", "--config", "--out"]),
        ("train-dcgan", ["--dataset", "Literal['digits', 'photographs']", "--image_size", "Optional[Literal[32, 64]]", "--config"]),
        ("giml", ["--model.latent_steps", "type: int", "--data.victim_mode", "--config"]),
    ],
)
def test_help_lists_typed_options(tool, expected):
    code, out, err = run_cli([tool, "--help"])
    assert code == 0, err
    text = " ".join(out.split())
    assert f"lightning-gi {tool}" in text
    for item in expected:
        assert item in text, (item, text[:3000])


@pytest.mark.parametrize(
    "argv,names",
    [
        (["aux-stats", "--out", "unused.pt", "--count", "abc"], ["--count", "int", "abc"]),
        (["aux-stats", "--out", "unused.pt", "--source", "faces"], ["--source", "public", "faces"]),
        (["aux-stats", "--count", "3"], ["--out", "required"]),
        (["train-dcgan", "--dataset", "faces"], ["--dataset", "digits", "photographs", "faces"]),
        (["train-dcgan", "--image-size", "48"], ["--image_size", "32", "64", "48"]),
        (["train-dcgan", "--no-such-flag", "1"], ["--no-such-flag"]),
        (["giml", "--model.latent_steps", "abc"], ["latent_steps", "abc"]),
    ],
)
def test_bad_flag_value_exits_2_with_one_sentence(argv, names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and nothing is
    code, out, err = run_cli(argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("lightning-gi: error: "), err
    message = lines[0].removeprefix("lightning-gi: error: ")
    assert len(lines) <= 2 and "Traceback" not in err and "usage:" not in err, err  # the sentence (+ the --debug hint)
    for name in names:
        assert name in message, (name, message)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- flag spellings
def test_older_flag_spellings_map_to_the_typed_options():
    from lightning_gi.tools import normalise_argv
    from lightning_gi.tools.aux_stats import aux_stats

    argv = ["--num-classes", "20", "--calibrate-bn", "--mean", "0.5", "0.4", "0.3", "--image-size=32", "--out", "x.pt"]
    assert normalise_argv(aux_stats, argv) == [
        "--num_classes", "20", "--calibrate_bn", "true", "--mean", "[0.5, 0.4, 0.3]", "--image_size=32", "--out", "x.pt"
    ]
    assert normalise_argv(aux_stats, ["--calibrate_bn", "false", "--no-such-flag"]) == ["--calibrate_bn", "false", "--no-such-flag"]


# ---------------------------------------------------------------------------------------------- public-images
def test_public_images_writes_labelled_digits_that_auto_labels_reads(tmp_path):
    """The bundled digits' PUBLIC pool (disjoint from the attacked digits), labels 0-9, read back weights-only and
    usable as ``AutoLabels(public_path=...)``; the photographs (other pictures in their public pool) are refused."""
    from lightning_gi.labels import AutoLabels
    from lightning_gi.victim.data import BundledDigits

    out = tmp_path / "public.pt"
    code, stdout, err = run_cli(["public-images", "--dataset", "digits", "--image_size", "16", "--per_class", "4",
                                 "--out", str(out)])
    assert code == 0, err
    blob = torch.load(out, weights_only=True)
    assert blob["images"].shape == (40, 3, 16, 16) and sorted(blob["labels"].tolist()) == sorted(list(range(10)) * 4)
    private = BundledDigits(image_size=16, channels=3, pool="private").images
    assert not any(bool((private - img).abs().amax(dim=(1, 2, 3)).eq(0).any()) for img in blob["images"])
    auto = AutoLabels(image_size=16, public_path=str(out))
    assert auto.public is not None and auto.public.public_images()[0].shape[0] == 40
    code, _, err = run_cli(["public-images", "--dataset", "photographs", "--out", str(tmp_path / "x.pt")])
    assert code == 2 and "photographs" in err and "Traceback" not in err and not (tmp_path / "x.pt").exists()
