"""Benchmarks of issue 3: gradient distances, Inverting Gradients, restarts, and the Lightning loop's speed.

Three parts, each writing one JSON envelope (``benchmarks.common.write_result``; sizes are flags; defaults fit a
shared CPU):

  wdlg       WDLG vs DLG vs iDLG on the sigmoid LeNet (14 classes), 32x32 bundled photographs, batch 1 and 4, the
             same budget of victim-gradient evaluations for every method: mean MSE, fraction with MSE < 1e-3.
             Each method is a shipped recipe (configs/dlg_lenet.yaml, idlg_lenet.yaml, wdlg_lenet.yaml) run
             through ``lightning_gi.cli.run``, its optimiser (and WDLG's mixed distance) set by a YAML edit.
  inverting  Inverting Gradients on ResNet-18, 32x32 photographs, batch 1 and 8: PSNR/SSIM after a fixed number of
             steps, with and without TV, with 1 and 4 restarts: the attack of
             configs/inverting_gradients_demo.yaml (TV and restarts edited) on this victim.
  speed      iterations/s of the InvertingGradients LightningModule (lean Trainer) vs a plain PyTorch loop of the
             same math (cosine + TV, signed Adam, box, MultiStepLR, best-iterate tracking), same run: loop
             overhead, which a config cannot express, so this part builds the attack itself.

Run (one thread; the machine may be shared):
  OMP_NUM_THREADS=1 python -m benchmarks.objectives_bench wdlg --trials 3 --evals 1000
  OMP_NUM_THREADS=1 python -m benchmarks.objectives_bench inverting --steps 60
  OMP_NUM_THREADS=1 python -m benchmarks.objectives_bench speed --steps 20 --repeats 3
  OMP_NUM_THREADS=1 python -m benchmarks.objectives_bench wdlg --smoke     # seconds (any part)
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/objectives_bench.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import add_common_arguments, config_path, environment, run_recipe, write_result  # noqa: E402
from lightning_gi.attacks import InvertingGradients  # noqa: E402
from lightning_gi.attacks.image_prior import box_bounds, milestones_from_fractions  # noqa: E402
from lightning_gi.cli import quiet_known_warnings  # noqa: E402
from lightning_gi.objectives import TotalVariation, cosine_distance  # noqa: E402
from lightning_gi.victim import FedSGDVictim, torchvision_classifier  # noqa: E402

CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]
LBFGS = {"class_path": "torch.optim.LBFGS", "init_args": {"lr": 1.0, "max_iter": 20, "max_eval": 20, "history_size": 100}}
ADAM = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.1}}


def _settings(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {**{k: v for k, v in vars(args).items() if k != "results_dir"}, **extra}


def _edit(optimizer: dict[str, Any] | None = None, **init_args: Any) -> Callable[[dict[str, Any]], None]:
    """A YAML edit: the attack's optimiser and other init_args replaced."""

    def edit(cfg: dict[str, Any]) -> None:
        if optimizer is not None:
            cfg["model"]["init_args"]["optimizer"] = optimizer
        cfg["model"]["init_args"].update(init_args)

    return edit


# ---------------------------------------------------------------------------------------------------
# (a) WDLG vs DLG vs iDLG
# ---------------------------------------------------------------------------------------------------
def wdlg_methods(l2_weight: float) -> dict[str, tuple[str, Callable[[dict[str, Any]], None], str]]:
    """name -> (recipe, YAML edit, optimiser kind: 'lbfgs' = 20 evaluations per step, 'adam' = 1)."""
    mixed = {"class_path": "lightning_gi.objectives.WassersteinDistance", "init_args": {"p": 1, "squared": False, "l2_weight": l2_weight}}
    return {
        "dlg": ("dlg_lenet.yaml", _edit(LBFGS), "lbfgs"),
        "idlg": ("idlg_lenet.yaml", _edit(LBFGS), "lbfgs"),
        "idlg_adam": ("idlg_lenet.yaml", _edit(ADAM), "adam"),
        "wdlg": ("wdlg_lenet.yaml", _edit(ADAM), "adam"),
        "wdlg_lbfgs": ("wdlg_lenet.yaml", _edit(LBFGS), "lbfgs"),
        "wdlg_mixed": ("wdlg_lenet.yaml", _edit(ADAM, distance=mixed), "adam"),
    }


def _lenet_overrides(steps: int, bs: int, trial: int) -> list[str]:
    return [f"--trainer.max_steps={steps}", "--trainer.logger=false", f"--model.init_args.seed={trial}",
            "--data.init_args.model.init_args.num_classes=14", f"--data.init_args.source.init_args.batch_size={bs}",
            f"--data.init_args.source.init_args.batch_seed={1000 + trial}", f"--data.init_args.model_seed={trial}"]


def bench_wdlg(args: argparse.Namespace) -> None:
    methods = wdlg_methods(args.mixed_l2_weight)
    chosen = args.methods or list(methods)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for bs in args.batch_sizes:
            for name in chosen:
                recipe, edit, kind = methods[name]
                steps = max(1, args.evals // 20) if kind == "lbfgs" else args.evals
                per_trial = []
                for trial in range(args.trials):
                    m, _ = run_recipe(config_path(recipe), _lenet_overrides(steps, bs, trial), f"{work}/{name}_{bs}_{trial}", edit=edit)
                    per_trial.append({"kind": "run", "method": name, "batch_size": bs, "trial": trial,
                                      "mse": [p["mse"] for p in m["per_image"]], "psnr": [p["psnr"] for p in m["per_image"]],
                                      "label_accuracy": m.get("label_multiset_accuracy", m["label_accuracy"]),
                                      "matching_distance": m["matching_distance"], "seconds": m["seconds"]})
                    print(f"wdlg-bench bs={bs} {name} trial={trial} mse={statistics.mean(per_trial[-1]['mse']):.4g} "
                          f"labels={per_trial[-1]['label_accuracy']:.2f} {m['seconds']:.1f}s", flush=True)
                mses = [v for t in per_trial for v in t["mse"]]
                rows += per_trial
                rows.append({
                    "kind": "summary", "method": name, "batch_size": bs, "recipe": f"configs/{recipe}",
                    "optimizer": "L-BFGS(lr=1, max_iter=20, max_eval=20, history=100)" if kind == "lbfgs" else "Adam(lr=0.1)",
                    "optimizer_steps": steps, "gradient_evaluations": args.evals, "images": len(mses),
                    "mean_mse": statistics.mean(mses), "median_mse": statistics.median(mses),
                    "fraction_mse_below_1e-3": sum(v < 1e-3 for v in mses) / len(mses),
                    "mean_psnr": statistics.mean(p for t in per_trial for p in t["psnr"]),
                    "label_accuracy": statistics.mean(t["label_accuracy"] for t in per_trial),
                    "mean_seconds": statistics.mean(t["seconds"] for t in per_trial),
                })
    write_result("wdlg_lenet", _settings(
        args, description="WDLG vs DLG vs iDLG, sigmoid LeNet (14 classes), 32x32 bundled photographs",
        budget=f"{args.evals} victim-gradient evaluations per run for every method",
        paper_reference="Wang et al. 2023 Table: LeNet+CIFAR10 MSE DLG 0.013, RGAP 0.0048, WDLG 0.0045"),
        rows, name=args.out or "wdlg_lenet", out=args.results_dir, env=environment())


# ---------------------------------------------------------------------------------------------------
# (b) Inverting Gradients on ResNet-18
# ---------------------------------------------------------------------------------------------------
def resnet_victim(bs: int, seed: int) -> FedSGDVictim:
    return FedSGDVictim(
        torchvision_classifier("resnet18", num_classes=14),
        dataset="photographs",
        image_shape=(3, 32, 32),
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        batch_size=bs,
        batch_seed=seed,
        model_seed=seed,
    )


def _resnet_edit(tv: float, restarts: int, bs: int, seed: int) -> Callable[[dict[str, Any]], None]:
    """The IG recipe's attack (TV weight and restarts edited) on the untrained ResNet-18 victim."""

    def edit(cfg: dict[str, Any]) -> None:
        init = cfg["model"]["init_args"]
        init["priors"] = [{"class_path": "lightning_gi.objectives.TotalVariation", "init_args": {"weight": tv}}] if tv > 0 else []
        init["restarts"] = restarts
        cfg["data"]["init_args"].update({
            "model": {"class_path": "lightning_gi.victim.torchvision_classifier", "init_args": {"name": "resnet18", "num_classes": 14}},
            "mean": CIFAR_MEAN, "std": CIFAR_STD, "model_seed": seed})
        cfg["data"]["init_args"]["source"]["init_args"].update({"batch_size": bs, "batch_seed": seed})

    return edit


def bench_inverting(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for bs in args.batch_sizes:
            for tv in (0.0, args.tv):
                for restarts in args.restarts:
                    runs = []
                    for trial in range(args.trials):
                        overrides = [f"--trainer.max_steps={args.steps}", "--trainer.logger=false", f"--model.init_args.seed={trial}"]
                        m, cli = run_recipe(config_path("inverting_gradients_demo.yaml"), overrides, f"{work}/{bs}_{tv}_{restarts}_{trial}",
                                            edit=_resnet_edit(tv, restarts, bs, 2000 + trial))
                        rec = cli.model.reconstruction()
                        restart_losses = rec.get("restart_losses")
                        run = {"kind": "run", "batch_size": bs, "tv_weight": tv, "restarts": restarts, "steps": args.steps,
                               "trial": trial, "mse": [p["mse"] for p in m["per_image"]],
                               "psnr": [p["psnr"] for p in m["per_image"]], "ssim": [p["ssim"] for p in m["per_image"]],
                               "label_accuracy": m.get("label_multiset_accuracy", m["label_accuracy"]), "seconds": m["seconds"],
                               "matching_distance": m["matching_distance"],
                               "restart_losses": [float(v) for v in restart_losses] if restart_losses is not None else None,
                               "best_restart": int(rec["best_restart"]) if rec.get("best_restart") is not None else None}
                        runs.append(run)
                        print(f"ig-bench bs={bs} tv={tv} R={restarts} trial={trial} psnr={statistics.mean(run['psnr']):.2f} "
                              f"ssim={statistics.mean(run['ssim']):.3f} {m['seconds']:.1f}s", flush=True)
                    rows += runs
                    rows.append({
                        "kind": "summary", "batch_size": bs, "tv_weight": tv, "restarts": restarts, "steps": args.steps,
                        "mean_psnr": statistics.mean(p for r in runs for p in r["psnr"]),
                        "mean_ssim": statistics.mean(p for r in runs for p in r["ssim"]),
                        "mean_mse": statistics.mean(p for r in runs for p in r["mse"]),
                        "label_accuracy": statistics.mean(r["label_accuracy"] for r in runs),
                        "mean_seconds": statistics.mean(r["seconds"] for r in runs),
                    })
    write_result("inverting_gradients_resnet18", _settings(
        args, recipe="configs/inverting_gradients_demo.yaml (attack; victim: untrained ResNet-18)",
        description="Inverting Gradients (cosine + TV, signed Adam lr 0.1, boxed, MultiStepLR 3/8,5/8,7/8), "
                    "untrained torchvision ResNet-18 (14 classes, eval mode), 32x32 bundled photographs",
        budget=f"{args.steps} optimiser steps per run (the paper runs 24,000); R restarts cost R x the compute"),
        rows, name=args.out or "inverting_gradients_resnet18", out=args.results_dir, env=environment())


# ---------------------------------------------------------------------------------------------------
# (c) speed: Lightning attack vs a plain loop of the same math
# ---------------------------------------------------------------------------------------------------
def plain_inverting_gradients(dm: FedSGDVictim, init: torch.Tensor, labels: torch.Tensor, steps: int,
                              tv_weight: float, total_steps: int) -> tuple[torch.Tensor, float, float]:
    """The InvertingGradients step written as a plain PyTorch loop (one restart)."""
    model = dm.model
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    target = [g.clone() for g in dm.observation.gradients]
    x = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones_from_fractions([3 / 8, 5 / 8, 7 / 8], total_steps), 0.1)
    low, high = box_bounds(dm.mean, dm.std)
    tv = TotalVariation(weight=tv_weight)
    best_loss = torch.tensor(float("inf"))
    best = x.detach().clone()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        distance = cosine_distance(grads, target)
        total = distance + tv_weight * tv(x)
        better = distance.detach() < best_loss
        best_loss = torch.where(better, distance.detach(), best_loss)
        best = torch.where(better, x.detach(), best)
        total.backward(inputs=[x])
        x.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))
    return x.detach(), time.perf_counter() - t0, time.process_time() - c0


class _StepTimer(pl.Callback):
    """Times optimiser steps only (excludes Trainer start-up/tear-down), from the first batch start."""

    def __init__(self) -> None:
        self.start = None
        self.end = None
        self.cpu_start = None
        self.cpu_end = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.start is None:
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()
        self.cpu_end = time.process_time()


def bench_speed(args: argparse.Namespace) -> None:
    tv_weight = 1e-4
    rows = []
    max_abs_diff = None
    for rep in range(args.repeats):
        finals: dict[str, torch.Tensor] = {}
        for which in ("lightning", "plain") if rep % 2 == 0 else ("plain", "lightning"):
            dm = resnet_victim(args.batch_size, 3000)
            dm.setup()
            attack = InvertingGradients(priors=[TotalVariation(weight=tv_weight)], seed=rep)
            attack.bind(dm.attack_inputs())
            init = attack.dummy_images.detach()[0].clone()
            if which == "lightning":
                timer = _StepTimer()
                trainer = pl.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False,
                                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                                     devices=1, callbacks=[timer])
                t0 = time.perf_counter()
                trainer.fit(attack, datamodule=dm)
                total = time.perf_counter() - t0
                seconds = timer.end - timer.start
                cpu = timer.cpu_end - timer.cpu_start
                final = attack.dummy_images.detach()[0]
                rows.append({"rep": rep, "loop": which, "steps": args.steps, "seconds": seconds,
                             "seconds_including_trainer_setup": total, "it_per_s": args.steps / seconds,
                             "cpu_seconds": cpu, "it_per_cpu_s": args.steps / cpu})
                finals["lightning"] = final
            else:
                final, seconds, cpu = plain_inverting_gradients(dm, init, attack.labels, args.steps, tv_weight, args.steps)
                rows.append({"rep": rep, "loop": which, "steps": args.steps, "seconds": seconds,
                             "it_per_s": args.steps / seconds, "cpu_seconds": cpu, "it_per_cpu_s": args.steps / cpu})
                finals["plain"] = final
            print(f"speed rep={rep} {which}: {rows[-1]['it_per_s']:.3f} it/s (wall), "
                  f"{rows[-1]['it_per_cpu_s']:.3f} it per CPU-second", flush=True)
        diff = float((finals["lightning"] - finals["plain"]).abs().max())  # same init, same math
        max_abs_diff = diff if max_abs_diff is None else max(max_abs_diff, diff)
    light = statistics.median(r["it_per_s"] for r in rows if r["loop"] == "lightning")
    plain = statistics.median(r["it_per_s"] for r in rows if r["loop"] == "plain")
    light_cpu = statistics.median(r["it_per_cpu_s"] for r in rows if r["loop"] == "lightning")
    plain_cpu = statistics.median(r["it_per_cpu_s"] for r in rows if r["loop"] == "plain")
    summary = {
        "kind": "summary",
        "median_it_per_s.lightning": light, "median_it_per_s.plain": plain,
        "lightning_over_plain": light / plain,
        "median_it_per_cpu_s.lightning": light_cpu, "median_it_per_cpu_s.plain": plain_cpu,
        "lightning_over_plain_cpu": light_cpu / plain_cpu,
        "within_10_percent": light_cpu >= 0.9 * plain_cpu,
        "max_abs_difference_of_final_images": max_abs_diff,
    }
    write_result("inverting_gradients_speed", _settings(
        args, description="InvertingGradients LightningModule (lean Trainer) vs plain PyTorch loop, same math, same run",
        setup=f"untrained ResNet-18, 32x32, batch {args.batch_size}, 1 restart, cosine + TV, signed Adam, "
              "boxed, MultiStepLR, best-iterate tracking",
        note="one thread; wall-clock rates are noisy on a shared machine, so the verdict uses CPU time of "
             "this process (process_time), which the other processes do not inflate"),
        [{"kind": "run", **r} for r in rows] + [summary], name=args.out or "inverting_gradients_speed",
        out=args.results_dir, env=environment())


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    a = sub.add_parser("wdlg")
    a.add_argument("--trials", type=int, default=3)
    a.add_argument("--evals", type=int, default=1000, help="victim-gradient evaluations per run (all methods)")
    a.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    a.add_argument("--methods", nargs="+", default=None)
    a.add_argument("--mixed-l2-weight", type=float, default=100.0)
    a.add_argument("--out", default=None)
    b = sub.add_parser("inverting")
    b.add_argument("--steps", type=int, default=60)
    b.add_argument("--trials", type=int, default=1)
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    b.add_argument("--restarts", type=int, nargs="+", default=[1, 4])
    b.add_argument("--tv", type=float, default=1e-4)
    b.add_argument("--out", default=None)
    c = sub.add_parser("speed")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--batch-size", type=int, default=1)
    c.add_argument("--out", default=None)
    for sp in (a, b, c):
        add_common_arguments(sp)
    args = parser.parse_args(argv)
    if args.smoke:
        smoke = {"wdlg": dict(trials=1, evals=40, batch_sizes=[1], methods=["idlg", "wdlg"]),
                 "inverting": dict(steps=2, trials=1, batch_sizes=[1], restarts=[1]),
                 "speed": dict(steps=2, repeats=1)}[args.part]
        for k, v in smoke.items():
            setattr(args, k, v)
    torch.set_num_threads(1)
    quiet_known_warnings()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    {"wdlg": bench_wdlg, "inverting": bench_inverting, "speed": bench_speed}[args.part](args)


if __name__ == "__main__":
    main(sys.argv[1:])
