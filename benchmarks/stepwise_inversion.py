"""Issue-5 bar: inversion quality of the stepwise attack's ablation rows, same budget, same gradients.

Every row runs the shipped recipe ``configs/stepwise_demo.yaml`` through ``lightning_gi.cli.run``: the recipe's
YAML is loaded, the ablated parts are removed (``benchmarks.common.run_recipe(edit=...)``), and the budget, the
batch and the seed are set by overrides. Rows (Ye et al. 2024, Table 2), all with the recipe's optimiser (Adam
lr 0.1 on the authors' quantised sign, warm-up, step decay 0.33 at 37.5/62.5/87.5 %), the TRUE labels (shared
by the client: this isolates Stage II), the same initialisation seed and the same observed gradient:

* ``cosine``     - cosine distance over all gradient tensors, no prior, no schedule callback;
* ``+priors``    - + TV (5e-3) + BN statistics (1e-4) from the first step;
* ``+stepwise``  - + deep -> shallow tensor introduction + gradient dropout 0.3 (priors from the start);
* ``+schedule``  - + priors switched on late (TV at 20 %, BN at 33 % of the run): the recipe as shipped;

plus ``+schedule_last`` (the full recipe returning the last iterate, the authors' rule, instead of the best) and
``inverting_gradients`` (the attack section of ``configs/inverting_gradients_demo.yaml`` with 1 restart on this
victim and these labels). The schedules' step counts are scaled to ``--steps`` as the recipe scales the
authors' 15,000 (``lightning_gi.attacks.stepwise.paper_callbacks``). Each row also records the reported
``matching_distance`` and an independently computed cosine distance of the returned images' gradient to the
observed one (all tensors, no dropout mask): the two must agree. Victim: the recipe's BN-calibrated torchvision
ResNet-18 (1000-class head, eval mode), bundled real photographs with unique labels. Metrics from each run's
``metrics.json``: PSNR / SSIM after one-to-one assignment; LPIPS when the AlexNet backbone file is on disk
(checkpoints/README.md), else null.

    OMP_NUM_THREADS=1 python -m benchmarks.stepwise_inversion [--size 32] [--batch 4] [--steps 300] [--batches 1] [--smoke]
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/stepwise_inversion.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import tempfile
from typing import Any, Callable, Optional

import torch

from benchmarks.common import add_common_arguments, config_path, run_recipe, single_thread, write_result

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
RECIPE = "stepwise_demo.yaml"
SCHEDULES = ("StepwiseGradientSchedule", "GradientDropout", "PriorSchedule")
PAPER_ABLATION = {"cosine": [0.80, 8.34, 0.27], "+priors": [0.57, 10.79, 0.34], "+stepwise": [0.27, 14.71, 0.50],
                  "+schedule": [0.23, 15.99, 0.55], "columns": ["lpips", "psnr", "ssim"]}


def unmasked_full_distance(attack, images01: torch.Tensor) -> float:
    """Cosine distance over ALL gradient tensors, no mask, of the returned images (computed from scratch)."""
    from lightning_gi.objectives import cosine_distance

    model = attack.victim
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(model((images01 - mean) / std), attack.labels.cpu())
        grads = torch.autograd.grad(loss, list(model.parameters()))
    target = [g.detach().cpu() for g in attack.observation.gradients]
    return float(cosine_distance([g.detach() for g in grads], target))


def _edit(row: str, steps: int, seed: int) -> Callable[[dict[str, Any]], None]:
    """The YAML edit that turns the shipped recipe into the ablation row ``row`` at ``steps`` steps."""
    scale = steps / 15_000

    def edit(cfg: dict[str, Any]) -> None:
        if row == "inverting_gradients":
            import yaml

            cfg["model"] = yaml.safe_load(config_path("inverting_gradients_demo.yaml").read_text())["model"]
            cfg["model"]["init_args"]["restarts"] = 1
        init = cfg["model"]["init_args"]
        init["label_strategy"] = {"class_path": "lightning_gi.labels.SharedLabels"}
        if row == "cosine":
            init["priors"] = []
        if row == "+schedule_last":
            init["return_iterate"] = "last"
        keep = {"+stepwise": SCHEDULES[:2], "+schedule": SCHEDULES, "+schedule_last": SCHEDULES}.get(row, ())
        callbacks = []
        for cb in cfg["trainer"].get("callbacks") or []:
            name = cb["class_path"].rsplit(".", 1)[-1]
            if name in SCHEDULES and name not in keep:
                continue
            args = cb.setdefault("init_args", {})
            if name == "StepwiseGradientSchedule":
                args["every"] = max(1, round(500 * scale))  # the authors' every 500 of 15,000 steps
            elif name == "GradientDropout":
                args["seed"] = seed
            elif name == "PriorSchedule":  # TV at 3,000 and BN at 5,000 of 15,000 steps
                at = {"TotalVariation": 3000, "BNStatisticsPrior": 5000}
                for sw in args["switches"]:
                    sw["step"] = max(0, round(at[sw["prior"]] * scale))
            callbacks.append(cb)
        cfg["trainer"]["callbacks"] = callbacks

    return edit


def run_row(row: str, args: argparse.Namespace, seed: int, work: str) -> dict[str, Any]:
    """One ablation row on batch ``seed``: the run's metrics and the recomputed unmasked distance."""
    s = args.size
    overrides = [
        f"--trainer.max_steps={args.steps}", "--trainer.logger=false",
        f"--model.init_args.seed={seed}",
        f"--data.init_args.source.init_args.batch_size={args.batch}", f"--data.init_args.source.init_args.batch_seed={seed}",
        '--data.init_args.source={"init_args": {"label_mode": "unique", "num_distinct": null}}', "--data.init_args.share_labels=true",
        f"--data.init_args.image_shape=[3,{s},{s}]",
        f"--data.init_args.model.init_args.name={args.model}", f"--data.init_args.model.init_args.image_size={s}",
    ]
    m, cli = run_recipe(config_path(RECIPE), overrides, f"{work}/{row}_{seed}", edit=_edit(row, args.steps, seed))
    images = cli.model.reconstruction()["images"]
    return {"batch_seed": seed, "psnr": m["psnr"], "ssim": m["ssim"], "lpips": m["lpips"], "seconds": m["seconds"],
            "reported_distance": m["matching_distance"], "unmasked_full_distance": unmasked_full_distance(cli.model, images),
            "label_accuracy": m["label_accuracy"]}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batches", type=int, default=1, help="number of private batches (seeds)")
    parser.add_argument("--rows", default="cosine,+priors,+stepwise,+schedule,+schedule_last,inverting_gradients")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument("--model", default="resnet18")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.steps, args.batches, args.rows = 32, 1, 2, 1, "cosine,+schedule"
    single_thread()

    rows = args.rows.split(",")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for b in range(args.batches):
            for row in rows:
                entry = {"kind": "run", "row": row, **run_row(row, args, b, work)}
                results.append(entry)
                print(f"batch {b} {row:>20}: PSNR {entry['psnr']:.2f} SSIM {entry['ssim']:.3f} LPIPS {entry['lpips']} "
                      f"distance reported {entry['reported_distance']:.4f} / recomputed {entry['unmasked_full_distance']:.4f} "
                      f"({entry['seconds']:.0f}s)", flush=True)
    for row in rows:
        entries = [e for e in results if e["kind"] == "run" and e["row"] == row]
        results.append({"kind": "mean", "row": row, **{
            k: (sum(e[k] for e in entries) / len(entries) if all(e[k] is not None for e in entries) else None)
            for k in ("psnr", "ssim", "lpips", "seconds", "reported_distance", "unmasked_full_distance")}})
    settings = {k: v for k, v in vars(args).items() if k != "results_dir"}
    settings.update({"recipe": f"configs/{RECIPE}", "paper_ablation_resnet34_224px_b8_15k": PAPER_ABLATION})
    write_result("stepwise_inversion", settings, results, out=args.results_dir,
                 name=f"stepwise_inversion_{args.model}_{args.size}px_b{args.batch}_{args.steps}steps{args.tag}")


if __name__ == "__main__":
    main()
