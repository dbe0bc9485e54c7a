"""Benchmarks of issue 3: gradient distances, Inverting Gradients, restarts, and the Lightning loop's speed.

Three parts, each writing one JSON file to benchmarks/results/ (sizes are flags; defaults fit a shared CPU):

  wdlg       WDLG vs DLG vs iDLG on the sigmoid LeNet, 32x32 bundled photographs, batch 1 and 4, the same
             budget of victim-gradient evaluations for every method: mean MSE, fraction with MSE < 1e-3.
  inverting  Inverting Gradients on ResNet-18, 32x32 photographs, batch 1 and 8: PSNR/SSIM after a fixed
             number of steps, with and without TV, with 1 and 4 restarts.
  speed      iterations/s of the InvertingGradients LightningModule (lean Trainer) vs a plain PyTorch loop of
             the same math (cosine + TV, signed Adam, box, MultiStepLR, best-iterate tracking), same run.

Run (one thread; the machine may be shared):
  OMP_NUM_THREADS=1 python benchmarks/objectives_bench.py wdlg --trials 3 --evals 1000
  OMP_NUM_THREADS=1 python benchmarks/objectives_bench.py inverting --steps 60
  OMP_NUM_THREADS=1 python benchmarks/objectives_bench.py speed --steps 20 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_gi.attacks import DLG, IDLG, WDLG, InvertingGradients  # noqa: E402
from lightning_gi.attacks.image_prior import box_bounds, milestones_from_fractions  # noqa: E402
from lightning_gi.cli import quiet_known_warnings  # noqa: E402
from lightning_gi.metrics import match_reconstructions, per_image_scores  # noqa: E402
from lightning_gi.objectives import TotalVariation, WassersteinDistance, cosine_distance  # noqa: E402
from lightning_gi.victim import FedSGDVictim, LeNet, torchvision_classifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]


def lean_trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def score(images: torch.Tensor, truth: torch.Tensor) -> dict[str, list[float]]:
    perm = match_reconstructions(images, truth)
    s = per_image_scores(images[perm], truth)
    return {k: [float(v) for v in s[k]] for k in ("mse", "psnr", "ssim")}


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}", flush=True)
    return path


# ---------------------------------------------------------------------------------------------------
# (a) WDLG vs DLG vs iDLG
# ---------------------------------------------------------------------------------------------------
def lbfgs(params: Any) -> torch.optim.Optimizer:
    # max_eval = max_iter: exactly <= 20 victim-gradient evaluations per optimiser step
    return torch.optim.LBFGS(params, lr=1.0, max_iter=20, max_eval=20, history_size=100)


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.1)


def wdlg_methods(l2_weight: float) -> dict[str, tuple[Callable[[int], pl.LightningModule], str]]:
    """name -> (factory(seed), optimiser kind: 'lbfgs' = 20 evaluations per step, 'adam' = 1)."""
    return {
        "dlg": (lambda s: DLG(optimizer=lbfgs, seed=s), "lbfgs"),
        "idlg": (lambda s: IDLG(optimizer=lbfgs, seed=s), "lbfgs"),
        "idlg_adam": (lambda s: IDLG(optimizer=adam, seed=s), "adam"),
        "wdlg": (lambda s: WDLG(optimizer=adam, seed=s), "adam"),
        "wdlg_lbfgs": (lambda s: WDLG(optimizer=lbfgs, seed=s), "lbfgs"),
        "wdlg_mixed": (lambda s: WDLG(optimizer=adam, distance=WassersteinDistance(p=1, l2_weight=l2_weight), seed=s), "adam"),
    }


def bench_wdlg(args: argparse.Namespace) -> None:
    methods = wdlg_methods(args.mixed_l2_weight)
    chosen = args.methods or list(methods)
    results: dict[str, Any] = {}
    for bs in args.batch_sizes:
        for name in chosen:
            factory, kind = methods[name]
            steps = args.evals // 20 if kind == "lbfgs" else args.evals
            per_trial = []
            for trial in range(args.trials):
                dm = FedSGDVictim(
                    LeNet(num_classes=14, image_size=32),
                    dataset="photographs",
                    image_shape=(3, 32, 32),
                    batch_size=bs,
                    batch_seed=1000 + trial,
                    model_seed=trial,
                )
                attack = factory(trial)
                t0 = time.perf_counter()
                lean_trainer(steps).fit(attack, datamodule=dm)
                seconds = time.perf_counter() - t0
                rec = attack.reconstruction()
                gt = dm.ground_truth()
                s = score(rec["images"], gt.images)
                label_acc = float((rec["labels"].sort().values == gt.labels.sort().values).float().mean())
                per_trial.append({"trial": trial, "mse": s["mse"], "psnr": s["psnr"], "label_accuracy": label_acc,
                                  "matching_distance": rec["matching_distance"], "seconds": seconds})
                print(f"wdlg-bench bs={bs} {name} trial={trial} mse={statistics.mean(s['mse']):.4g} "
                      f"labels={label_acc:.2f} {seconds:.1f}s", flush=True)
            mses = [m for t in per_trial for m in t["mse"]]
            results[f"{name}/batch{bs}"] = {
                "method": name,
                "batch_size": bs,
                "optimizer": "L-BFGS(lr=1, max_iter=20, max_eval=20, history=100)" if kind == "lbfgs" else "Adam(lr=0.1)",
                "optimizer_steps": steps,
                "gradient_evaluations": args.evals,
                "images": len(mses),
                "mean_mse": statistics.mean(mses),
                "median_mse": statistics.median(mses),
                "fraction_mse_below_1e-3": sum(m < 1e-3 for m in mses) / len(mses),
                "mean_psnr": statistics.mean(p for t in per_trial for p in t["psnr"]),
                "label_accuracy": statistics.mean(t["label_accuracy"] for t in per_trial),
                "mean_seconds": statistics.mean(t["seconds"] for t in per_trial),
                "trials": per_trial,
            }
    write(args.out or "wdlg_lenet", {
        "benchmark": "WDLG vs DLG vs iDLG, sigmoid LeNet (14 classes), 32x32 bundled photographs",
        "budget": f"{args.evals} victim-gradient evaluations per run for every method",
        "mixed_l2_weight": args.mixed_l2_weight,
        "paper_reference": "Wang et al. 2023 Table: LeNet+CIFAR10 MSE DLG 0.013, RGAP 0.0048, WDLG 0.0045",
        "environment": environment(),
        "results": results,
    })


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


def bench_inverting(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {}
    for bs in args.batch_sizes:
        for tv in (0.0, args.tv):
            for restarts in args.restarts:
                runs = []
                for trial in range(args.trials):
                    dm = resnet_victim(bs, 2000 + trial)
                    attack = InvertingGradients(
                        priors=[TotalVariation(weight=tv)] if tv > 0 else [], restarts=restarts, seed=trial
                    )
                    t0 = time.perf_counter()
                    lean_trainer(args.steps).fit(attack, datamodule=dm)
                    seconds = time.perf_counter() - t0
                    rec = attack.reconstruction()
                    gt = dm.ground_truth()
                    s = score(rec["images"], gt.images)
                    label_acc = float((rec["labels"].sort().values == gt.labels.sort().values).float().mean())
                    runs.append({"trial": trial, **s, "label_accuracy": label_acc, "seconds": seconds,
                                 "matching_distance": rec["matching_distance"], "restart_losses": rec["restart_losses"],
                                 "best_restart": rec["best_restart"]})
                    print(f"ig-bench bs={bs} tv={tv} R={restarts} trial={trial} psnr={statistics.mean(s['psnr']):.2f} "
                          f"ssim={statistics.mean(s['ssim']):.3f} {seconds:.1f}s", flush=True)
                key = f"batch{bs}/tv{tv:g}/restarts{restarts}"
                results[key] = {
                    "batch_size": bs, "tv_weight": tv, "restarts": restarts, "steps": args.steps,
                    "mean_psnr": statistics.mean(p for r in runs for p in r["psnr"]),
                    "mean_ssim": statistics.mean(p for r in runs for p in r["ssim"]),
                    "mean_mse": statistics.mean(p for r in runs for p in r["mse"]),
                    "label_accuracy": statistics.mean(r["label_accuracy"] for r in runs),
                    "mean_seconds": statistics.mean(r["seconds"] for r in runs),
                    "runs": runs,
                }
    write(args.out or "inverting_gradients_resnet18", {
        "benchmark": "Inverting Gradients (cosine + TV, signed Adam lr 0.1, boxed, MultiStepLR 3/8,5/8,7/8), "
                     "untrained torchvision ResNet-18 (14 classes, eval mode), 32x32 bundled photographs",
        "budget": f"{args.steps} optimiser steps per run (the paper runs 24,000); R restarts cost R x the compute",
        "environment": environment(),
        "results": results,
    })


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
    write(args.out or "inverting_gradients_speed", {
        "benchmark": "InvertingGradients LightningModule (lean Trainer) vs plain PyTorch loop, same math, same run",
        "setup": f"untrained ResNet-18, 32x32, batch {args.batch_size}, 1 restart, cosine + TV, signed Adam, "
                 "boxed, MultiStepLR, best-iterate tracking",
        "median_it_per_s": {"lightning": light, "plain": plain},
        "lightning_over_plain": light / plain,
        "median_it_per_cpu_s": {"lightning": light_cpu, "plain": plain_cpu},
        "lightning_over_plain_cpu": light_cpu / plain_cpu,
        "within_10_percent": light_cpu >= 0.9 * plain_cpu,
        "note": "one thread; wall-clock rates are noisy on a shared machine, so the verdict uses CPU time of "
                "this process (process_time), which the other processes do not inflate",
        "max_abs_difference_of_final_images": max_abs_diff,
        "environment": environment(),
        "rows": rows,
    })


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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_known_warnings()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    {"wdlg": bench_wdlg, "inverting": bench_inverting, "speed": bench_speed}[args.part](args)


if __name__ == "__main__":
    main(sys.argv[1:])
