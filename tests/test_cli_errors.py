"""Every bad input a user can give the CLI ends in one short sentence naming the cause, exit status 2.

The table covers the command line, the config, the victim's files, observation files and ground-truth
files (issues 14.4 and 16.12/16.13). ``--debug`` shows the full traceback instead.
"""
import contextlib
import gzip
import io
import re
from pathlib import Path

import pytest
import torch
import yaml

from lightning_gi.cli import main
from lightning_gi.observation import capture_observation
from lightning_gi.victim import LeNet
from factories import run_cli

ROOT = Path(__file__).resolve().parents[1]

LENET = {"class_path": "lightning_gi.victim.LeNet", "init_args": {"num_classes": 10, "image_size": 16}}


def base_config(victim="fedsgd", **data_args):
    if victim == "fedsgd":
        data = {"class_path": "lightning_gi.victim.FedSGDVictim",
                "init_args": {"model": LENET, "image_shape": [3, 16, 16], "dataset": "photographs"}}
    else:
        data = {"class_path": "lightning_gi.victim.ObservationFileVictim",
                "init_args": {"model": LENET, "image_shape": [3, 16, 16]}}
    data["init_args"].update(data_args)
    return {
        "model": {"class_path": "lightning_gi.attacks.IDLG", "init_args": {"seed": 0}},
        "data": data,
        "trainer": {"max_steps": 1, "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
                    "accelerator": "cpu", "enable_model_summary": False},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad files, made once: observations, ground truths, weights."""
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    image = torch.rand(1, 3, 16, 16)
    good = capture_observation(model, image, torch.tensor([2])).to_dict()
    g, names = list(good["gradients"]), list(good["param_names"])
    f = {}

    def save(name, obj):
        path = d / name
        torch.save(obj, path)
        f[name] = str(path)

    save("obs_good.pt", good)
    save("weights.pt", model.state_dict())
    f["empty.pt"] = str(d / "empty.pt")
    (d / "empty.pt").write_bytes(b"")
    f["text.pt"] = str(d / "text.pt")
    (d / "text.pt").write_text("gradients: [1, 2, 3]\n")
    raw = (d / "obs_good.pt").read_bytes()
    f["gzip.pt"] = str(d / "gzip.pt")
    (d / "gzip.pt").write_bytes(gzip.compress(raw))
    f["truncated.pt"] = str(d / "truncated.pt")
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    f["weights_truncated.pt"] = str(d / "weights_truncated.pt")
    (d / "weights_truncated.pt").write_bytes((d / "weights.pt").read_bytes()[:200])
    save("obs_sparse.pt", dict(good, gradients=[g[0].to_sparse()] + g[1:]))
    save("obs_meta.pt", dict(good, gradients=[torch.empty(g[0].shape, device="meta")] + g[1:]))
    save("obs_huge_batch.pt", dict(good, batch_size=10**6))
    swapped, swapped_names = list(g), list(names)
    swapped[2], swapped[4] = swapped[4], swapped[2]
    swapped_names[2], swapped_names[4] = swapped_names[4], swapped_names[2]
    save("obs_swapped.pt", dict(good, gradients=swapped, param_names=swapped_names))
    save("obs_nan.pt", dict(good, gradients=g[:3] + [g[3] * float("nan")] + g[4:]))
    save("obs_count.pt", dict(good, gradients=g[:-2], param_names=names[:-2]))
    save("obs_shape.pt", dict(good, gradients=[g[0][:, :1]] + g[1:]))
    save("obs_label_range.pt", dict(good, labels=torch.tensor([10])))
    save("obs_label_count.pt", dict(good, labels=torch.tensor([1, 2])))
    save("obs_unknown_key.pt", dict(good, extra=1))
    save("obs_version.pt", dict(good, format_version=3))
    save("obs_list.pt", [1, 2, 3])
    save("obs_nested_metadata.pt", dict(good, metadata={"a": {"b": 1}}))
    save("obs_reduction.pt", dict(good, loss_reduction="max"))
    save("obs_dup_names.pt", dict(good, param_names=[names[0]] * len(names)))
    save("obs_int_grad.pt", dict(good, gradients=[g[0].long()] + g[1:]))
    save("obs_missing_key.pt", {"format_version": 1, "gradients": g})
    save("gt_good.pt", {"images": image, "labels": torch.tensor([2])})
    save("gt_3_labels.pt", {"images": image, "labels": torch.tensor([2, 3, 4])})
    save("gt_shape.pt", {"images": torch.rand(1, 3, 32, 32), "labels": torch.tensor([2])})
    save("gt_range.pt", {"images": image * 255, "labels": torch.tensor([2])})
    save("gt_list.pt", [image])
    save("gt_int.pt", {"images": (image * 255).to(torch.uint8), "labels": torch.tensor([2])})
    save("gt_neg_label.pt", {"images": image, "labels": torch.tensor([-1])})
    save("gt_two_images.pt", {"images": torch.rand(2, 3, 16, 16), "labels": torch.tensor([2, 3])})
    save("gt_unknown.pt", {"images": image, "labels": torch.tensor([2]), "private": 1})
    f["dir"] = str(d)
    return f


def _obs(name, **extra):
    return lambda f: base_config("file", observation_path=f[name], **extra)


def _gt(name):
    return lambda f: base_config("file", observation_path=f["obs_good.pt"], ground_truth_path=f[name])


def _with(path, value, victim="fedsgd"):
    def make(f):
        cfg = base_config(victim, observation_path=f["obs_good.pt"]) if victim == "file" else base_config()
        node = cfg
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value(f) if callable(value) else value
        return cfg
    return make


# (id, config maker (files -> dict) or None, extra command-line arguments (files -> list), cause pattern)
CASES = [
    # --- the command line
    ("validate subcommand", None, lambda f: ["validate"], r"unknown command 'validate'"),
    ("test subcommand", None, lambda f: ["test"], r"unknown command 'test'"),
    ("unknown option", lambda f: base_config(), lambda f: ["--trainer.nope=1"], r"nope"),
    ("missing config file", None, lambda f: ["fit", "--config", f["dir"] + "/nope.yaml"], r"nope\.yaml"),
    ("max_steps -1", lambda f: base_config(), lambda f: ["--trainer.max_steps=-1"], r"max_steps is -1.*step budget"),
    ("max_steps 0", lambda f: base_config(), lambda f: ["--trainer.max_steps=0"], r"max_steps is 0.*step budget"),
    ("resume from a missing checkpoint", lambda f: base_config(), lambda f: ["--ckpt_path", f["dir"] + "/none.ckpt"],
     r"checkpoint to resume from not found.*none\.ckpt"),
    ("resume from a text file", lambda f: base_config(), lambda f: ["--ckpt_path", f["text.pt"]],
     r"text\.pt.*not a torch\.save file"),
    ("resume from a truncated file", lambda f: base_config(), lambda f: ["--ckpt_path", f["truncated.pt"]],
     r"truncated\.pt.*truncated or corrupt"),
    ("resume from an observation", lambda f: base_config(), lambda f: ["--ckpt_path", f["obs_good.pt"]],
     r"not a Lightning checkpoint"),
    # --- the config
    ("unknown attack option", _with("model.init_args.learning_rate", 0.1), None, r"learning_rate"),
    ("unknown attack class", _with("model.class_path", "lightning_gi.attacks.Nope"), None, r"lightning_gi\.attacks.*Nope"),
    ("image_shape with 2 values", _with("data.init_args.image_shape", [3, 16]), None, r"image_shape"),
    ("image_shape with a zero", _with("data.init_args.image_shape", [3, 0, 16]), None, r"image_shape must be \(C, H, W\)"),
    ("image_shape the model rejects", _with("data.init_args.image_shape", [3, 20, 20]), None,
     r"does not accept inputs of shape \(3, 20, 20\)"),
    ("user model shape mismatch", _with("data.init_args.model", {"class_path": "lightning_gi.victim.LeNet",
                                                                 "init_args": {"num_classes": 10, "image_size": 32}}),
     None, r"does not accept inputs of shape \(3, 16, 16\)"),
    ("num_classes vs model", _with("data.init_args.num_classes", 7), None, r"num_classes=7"),
    ("negative noise defense", _with("data.init_args.defenses", [
        {"class_path": "lightning_gi.victim.defenses.GaussianNoise", "init_args": {"std": -1.0}}]), None,
     r"GaussianNoise std must be >= 0"),
    ("bad precision defense", _with("data.init_args.defenses", [
        {"class_path": "lightning_gi.victim.defenses.LowPrecision", "init_args": {"precision": "fp7"}}]), None,
     r"precision must be one of"),
    ("missing weights file", _with("data.init_args.weights_path", "nope-weights.pth"), None,
     r"'nope-weights\.pth' not found.*checkpoints/README\.md"),
    ("truncated weights file", _with("data.init_args.weights_path", lambda f: f["weights_truncated.pt"]), None,
     r"weights_truncated\.pt.*corrupt"),
    ("weights of another model", _with("data.init_args.model", {"class_path": "lightning_gi.victim.LeNet",
                                                                "init_args": {"num_classes": 5, "image_size": 16}}),
     lambda f: ["--data.init_args.weights_path", f["weights.pt"]], r"does not fit LeNet"),
    ("zero std", _with("data.init_args.std", [1.0, 0.0, 1.0]), None, r"std must be positive"),
    ("mean of the wrong length", _with("data.init_args.mean", [0.5]), None, r"mean/std need 3 values"),
    ("batch_size 0", _with("data.init_args.batch_size", 0), None, r"batch_size must be >= 1"),
    ("unknown dataset", _with("data.init_args.dataset", "nope"), None, r"nope"),
    ("missing dataset root", _with("data.init_args.dataset", "cifar10"), lambda f: ["--data.init_args.data_root",
                                                                                   f["dir"] + "/no_root"],
     r"cifar10.*no_root"),
    # --- observation files
    ("missing observation", _obs("obs_good.pt"), lambda f: ["--data.init_args.observation_path", f["dir"] + "/no.pt"],
     r"observation file not found"),
    ("empty observation", _obs("empty.pt"), None, r"empty \(0 bytes\): not a torch\.save file"),
    ("text observation", _obs("text.pt"), None, r"not a torch\.save file"),
    ("gzipped observation", _obs("gzip.pt"), None, r"gzip-compressed"),
    ("truncated observation", _obs("truncated.pt"), None, r"truncated or corrupt"),
    ("sparse gradient", _obs("obs_sparse.pt"), None, r"sparse_coo tensor, expected a dense tensor"),
    ("meta gradient", _obs("obs_meta.pt"), None, r"meta tensor"),
    ("huge batch_size", _obs("obs_huge_batch.pt"), None, r"'batch_size' is 1000000, above the supported maximum"),
    ("swapped gradients", _obs("obs_swapped.pt"), None, r"different order"),
    ("NaN gradient", _obs("obs_nan.pt"), None, r"gradients\[3\].*NaN/inf"),
    ("too few gradients", _obs("obs_count.pt"), None, r"6 gradient tensors but the victim model LeNet has 8"),
    ("gradient shape", _obs("obs_shape.pt"), None, r"gradients\[0\].*shape \(12, 1, 5, 5\)"),
    ("label out of range", _obs("obs_label_range.pt"), None, r"class >= num_classes=10"),
    ("labels vs batch_size", _obs("obs_label_count.pt"), None, r"'labels' has 2 entries but 'batch_size' is 1"),
    ("unknown observation key", _obs("obs_unknown_key.pt"), None, r"unknown observation key\(s\) \['extra'\]"),
    ("future format_version", _obs("obs_version.pt"), None, r"unsupported observation format_version 3"),
    ("observation not a dict", _obs("obs_list.pt"), None, r"must hold a dict, found list"),
    ("nested metadata", _obs("obs_nested_metadata.pt"), None, r"'metadata' entry 'a'"),
    ("bad loss_reduction", _obs("obs_reduction.pt"), None, r"'loss_reduction' must be 'mean' or 'sum'"),
    ("duplicate param_names", _obs("obs_dup_names.pt"), None, r"'param_names' lists .* more than once"),
    ("integer gradient", _obs("obs_int_grad.pt"), None, r"dtype torch\.int64, expected a floating-point"),
    ("observation without batch_size", _obs("obs_missing_key.pt"), None, r"missing required key\(s\) \['batch_size'\]"),
    # --- ground-truth files
    ("missing ground truth", _obs("obs_good.pt"), lambda f: ["--data.init_args.ground_truth_path", f["dir"] + "/gt.pt"],
     r"ground-truth file not found"),
    ("3 labels for 1 image", _gt("gt_3_labels.pt"), None, r"3 labels for 1 image"),
    ("ground truth of another size", _gt("gt_shape.pt"), None, r"'images' has shape \(1, 3, 32, 32\)"),
    ("ground truth in 0..255", _gt("gt_range.pt"), None, r"in \[0,1\]"),
    ("ground truth not a dict", _gt("gt_list.pt"), None, r"must hold a dict"),
    ("integer ground truth", _gt("gt_int.pt"), None, r"dtype torch\.uint8"),
    ("negative ground-truth label", _gt("gt_neg_label.pt"), None, r"labels \[-1\] outside"),
    ("ground truth with 2 images for 1", _gt("gt_two_images.pt"), None, r"2 images but the observation's batch_size is 1"),
    ("unknown ground-truth key", _gt("gt_unknown.pt"), None, r"unknown key\(s\) \['private'\]"),
    ("empty ground truth", _gt("empty.pt"), None, r"ground-truth file .*empty"),
]


def _args(case, files, tmp_path):
    _, make, extra, _ = case
    args = []
    if make is not None:
        cfg = make(files)
        cfg["trainer"]["default_root_dir"] = str(tmp_path)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = ["fit", "--config", str(path)]
    return args + (extra(files) if extra else [])


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_with_exit_status_2(case, files, tmp_path):
    code, out, err = run_cli(_args(case, files, tmp_path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-3000:])
    assert len(lines) <= 3, err[-3000:]
    assert "Traceback" not in err and "Does not validate against any of the Union subtypes" not in err
    message = " ".join(line for line in lines if "error" in line)
    assert re.search(case[3], message, flags=re.S), message
    assert not list(tmp_path.rglob("reconstruction.pt")), "a bad input must stop the run before step 0"


def test_debug_shows_the_traceback(files, tmp_path):
    case = next(c for c in CASES if c[0] == "3 labels for 1 image")
    with pytest.raises(Exception, match=r"3 labels for 1 image"):
        with contextlib.redirect_stdout(io.StringIO()):
            main(_args(case, files, tmp_path) + ["--debug"])


def test_good_inputs_still_run(files, tmp_path):
    """The same files without the defect run to the end (the table's errors are caused by the defect)."""
    cfg = base_config("file", observation_path=files["obs_good.pt"], ground_truth_path=files["gt_good.pt"],
                      weights_path=files["weights.pt"])
    cfg["trainer"]["default_root_dir"] = str(tmp_path)
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["fit", "--config", str(tmp_path / "ok.yaml")])
    assert code == 0, err[-3000:]


def test_tuple_param_names_are_accepted(files):
    """A tuple of names is a valid sequence of names (it used to raise a bare StopIteration)."""
    from lightning_gi.observation import GradientObservation

    raw = torch.load(files["obs_good.pt"], weights_only=True)
    obs = GradientObservation.from_dict(dict(raw, param_names=tuple(raw["param_names"])))
    obs.check_against(LeNet(num_classes=10, image_size=16), 10)
    assert obs.param_names == list(raw["param_names"])


def test_stepwise_resnet34_config_without_weights_is_one_sentence(tmp_path):
    """Issue 14.4: the shipped ResNet-34 recipe without its weights file (was 93 lines)."""
    code, out, err = run_cli(["fit", "--config", str(ROOT / "configs/stepwise_resnet34_imagenet.yaml"),
                              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) <= 3, err[-3000:]
    assert re.search(r"resnet34-b627a593\.pth' not found.*checkpoints/README\.md", err)


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.call"])
def test_a_config_cannot_pass_an_arbitrary_callable_as_the_distance(target, tmp_path):
    """Issue 16.6: distances are typed with the project's GradientDistance base, so `distance: os.system`
    is a config error (exit 2, one sentence), never a call."""
    cfg = base_config()
    cfg["model"] = {"class_path": "lightning_gi.attacks.WDLG", "init_args": {"seed": 0, "distance": target}}
    cfg["trainer"]["default_root_dir"] = str(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["fit", "--config", str(path)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert len(lines) <= 3 and "Traceback" not in err, err[-3000:]
    assert "distance" in err, err
    assert not list(tmp_path.rglob("reconstruction.pt"))
