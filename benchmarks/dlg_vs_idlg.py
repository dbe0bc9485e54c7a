"""Issue-2 bars: iDLG's label rule over random sigmoid LeNets (batch 1, 10 and 100 classes), and DLG vs iDLG
reconstructions (fraction of 32x32 photographs recovered to MSE < 1e-3, the iDLG paper's comparison).

The reconstructions run the shipped recipes ``configs/idlg_lenet.yaml`` and ``configs/dlg_lenet.yaml`` through
``lightning_gi.cli.run`` with overrides per case (``model_seed`` = ``batch_seed`` = ``seed`` = the case, the
LeNet head size, ``trainer.max_steps``); quality comes from each run's ``metrics.json``. The label-rule part
applies ``IDLGLabels`` to one captured gradient per random network (no attack runs: a config cannot express it)
with a uniformly random label of the head, as before the envelope.

    python -m benchmarks.dlg_vs_idlg [--networks 100] [--reconstructions 10] [--steps 300]
    python -m benchmarks.dlg_vs_idlg --reconstructions 0 --dlg-label-steps 50 --out dlg_labels
        (DLG's label accuracy on the first --dlg-label-networks cases, run with the DLG config)
    python -m benchmarks.dlg_vs_idlg --smoke      # seconds: 1 network, 1 case, 2 steps, 10 classes
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/dlg_vs_idlg.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import tempfile
from typing import Any, Optional

import torch

from benchmarks.common import add_common_arguments, config_path, environment, run_config, single_thread, write_result

CONFIGS = {"idlg": "idlg_lenet.yaml", "dlg": "dlg_lenet.yaml"}


def label_rule_accuracy(num_classes: int, networks: int, image_size: int) -> float:
    """Fraction of random sigmoid LeNets on which iDLG's rule returns the true label of one photograph."""
    from lightning_gi.labels import IDLGLabels
    from lightning_gi.observation import capture_observation
    from lightning_gi.victim import LeNet
    from lightning_gi.victim.data import BundledPhotographs

    photos = BundledPhotographs(image_size=image_size, crops_per_photo=8)
    gen = torch.Generator().manual_seed(1000 + num_classes)
    correct = 0
    for k in range(networks):
        torch.manual_seed(k)
        model = LeNet(num_classes=num_classes, image_size=image_size)
        idx = int(torch.randint(len(photos), (1,), generator=gen))
        image = photos[idx][0].unsqueeze(0)
        label = torch.randint(num_classes, (1,), generator=gen)
        obs = capture_observation(model, image, label)
        correct += int(IDLGLabels()(obs, model).item() == label.item())
    return correct / networks


def reconstruct(attack: str, case: int, num_classes: int, steps: int, image_size: int, work: str) -> dict[str, Any]:
    """One run of the attack's config on case ``case`` (its network, its photograph, its initialisation)."""
    overrides = [
        f"--trainer.max_steps={steps}",
        "--trainer.logger=false",
        f"--model.init_args.seed={case}",
        f"--data.init_args.model_seed={case}",
        f"--data.init_args.source.init_args.batch_seed={case}",
        f"--data.init_args.model.init_args.num_classes={num_classes}",
        f"--data.init_args.model.init_args.image_size={image_size}",
        f"--data.init_args.image_shape=[3,{image_size},{image_size}]",
    ]
    m = run_config(config_path(CONFIGS[attack]), overrides, f"{work}/{attack}_{num_classes}_{case}")
    return {"mse": m["mse"], "psnr": m["psnr"], "label_correct": m["label_accuracy"] == 1.0,
            "true_label": m["true_labels"][0], "recovered_label": m["recovered_labels"][0], "seconds": m["seconds"]}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", type=int, default=100, help="random LeNets per class count (label rule)")
    parser.add_argument("--reconstructions", type=int, default=10, help="cases per class count run with both configs")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--dlg-label-steps", type=int, default=0, help="also run the DLG config this many steps per case, for its label")
    parser.add_argument("--dlg-label-networks", type=int, default=100, help="cases of the DLG label run")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100], help="LeNet head sizes")
    parser.add_argument("--out", default="dlg_vs_idlg", help="name of the JSON file")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.networks, args.reconstructions, args.steps, args.classes = 1, 1, 2, [10]
        args.dlg_label_steps = 0
    single_thread()

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for num_classes in args.classes:
            summary: dict[str, Any] = {"kind": "summary", "num_classes": num_classes, "networks": args.networks,
                                       "idlg_rule_label_accuracy": label_rule_accuracy(num_classes, args.networks, args.image_size)}
            cases: dict[str, list[dict[str, Any]]] = {"idlg": [], "dlg": []}
            for k in range(args.reconstructions):
                for attack in ("idlg", "dlg"):
                    r = reconstruct(attack, k, num_classes, args.steps, args.image_size, work)
                    cases[attack].append(r)
                    rows.append({"kind": "case", "num_classes": num_classes, "network_seed": k, "attack": attack, **r})
                    print(num_classes, k, attack, {n: r[n] for n in ("mse", "label_correct")}, flush=True)
            if args.dlg_label_steps:
                hits = [reconstruct("dlg", k, num_classes, args.dlg_label_steps, args.image_size, work)["label_correct"]
                        for k in range(args.dlg_label_networks)]
                summary["dlg_label_accuracy_all_networks"] = sum(hits) / len(hits)
                summary["dlg_label_steps"] = args.dlg_label_steps
            for attack, cs in cases.items():
                if cs:
                    mses = [c["mse"] for c in cs]
                    summary.update({
                        f"{attack}.label_accuracy": sum(c["label_correct"] for c in cs) / len(cs),
                        f"{attack}.fraction_mse_below_1e-3": sum(m < 1e-3 for m in mses) / len(mses),
                        f"{attack}.median_mse": statistics.median(mses),
                        f"{attack}.mean_seconds": sum(c["seconds"] for c in cs) / len(cs),
                        f"{attack}.cases": len(cs),
                    })
            rows.append(summary)
            print(summary, flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "results_dir"}
    settings["recipes"] = {a: f"configs/{c}" for a, c in CONFIGS.items()}
    write_result("dlg_vs_idlg", settings, rows, name=args.out, out=args.results_dir, env=environment())


if __name__ == "__main__":
    main()
