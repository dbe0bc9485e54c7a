"""Issue-6 bars: GIAS vs image-space Inverting Gradients, the gain of GIAS's parameter phase, and GIML.

Part A (``--part gias``): a DCGAN prior fitted to the PUBLIC photographs (``lightning_gi.generators.train_dcgan``),
an untrained ResNet-18 (14 classes, 32x32), batches of 4 bundled private photographs. On the SAME gradient and the
SAME number of optimiser steps, each run is a shipped recipe run through ``lightning_gi.cli.run`` with its victim
section replaced by this victim (``benchmarks.common.run_recipe(edit=...)``):
  * Inverting Gradients: the attack of ``configs/inverting_gradients_demo.yaml`` (cosine + TV, signed Adam lr 0.1,
    boxed, MultiStepLR) with TV 1e-4 and 1 restart, image space;
  * GIAS latent search only ("GI-z"), the whole budget: the attack of ``configs/gias_dcgan_demo.yaml`` with the
    ``dcgan_photos32`` prior and ``param_steps: 0``;
  * GIAS = latent search (1/3 of the budget) then per-image parameter search (2/3), same recipe, and its
    latent-phase snapshot (the images at the switch).
Part B (``--part giml``): GIML meta-learns an untrained DCGAN from gradients of many batches (tasks) on random
sigmoid LeNets; GIAS (and latent search alone) with the generator snapshots at several meta-steps (0 = untrained)
on held-out tasks (other crops, other random networks). Snapshots taken during meta-training are not something a
config expresses, so this part builds GIML and GIAS itself.

    OMP_NUM_THREADS=1 python -m benchmarks.gias_bench [--part all|gias|giml] [--budget 240] [--batches 2]
        [--meta-steps 150] [--inner 30] [--meta-lr 1e-2] [--giml-loop authors|previous] [--smoke]
        ->  benchmarks/results/gias_bench.json: rows carry ``part`` (gias_vs_inverting_gradients, or the GIML key
        giml_authors_loop_meta_lr_*; "giml", "giml_meta_lr_0.001": the loop before issue 11) and ``kind``; a run
        of one part replaces that part's rows and settings and keeps the others.
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/gias_bench.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.common import (
    ROOT, add_common_arguments, config_path, lean_trainer, load_result, results_dir, run_recipe, single_thread,
    write_result,
)

PART_A = "gias_vs_inverting_gradients"


def _scores(images: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    from lightning_gi.metrics import reconstruction_metrics

    m = reconstruction_metrics(images, gt)
    return {"psnr": float(m["psnr"]), "ssim": float(m["ssim"]), "mse": float(m["mse"])}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _victim_edit(model_section: Optional[dict[str, Any]], batch: int) -> Callable[[dict[str, Any]], None]:
    """Replace the recipe's victim by part A's (and, with ``model_section``, its attack by that one)."""

    def edit(cfg: dict[str, Any]) -> None:
        if model_section is not None:
            cfg["model"] = copy.deepcopy(model_section)
        cfg["data"] = {"class_path": "lightning_gi.victim.FedSGDVictim", "init_args": {
            "model": {"class_path": "lightning_gi.victim.torchvision_classifier", "init_args": {"name": "resnet18", "num_classes": 14}},
            "model_seed": batch, "dataset": "photographs", "image_shape": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
            "batch_size": 4, "batch_seed": batch}}

    return edit


def part_gias(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from lightning_gi.generators.train_dcgan import train_photos_generator

    gen_path = Path(args.generator)
    t0 = time.perf_counter()
    if not gen_path.exists() or args.retrain:
        g = train_photos_generator(out=str(gen_path), steps=args.train_steps)
        fit_stats = g.training_stats
    else:
        fit_stats = {"reused": str(gen_path)}
    train_s = time.perf_counter() - t0
    print("generator", fit_stats, f"{train_s:.0f}s", flush=True)
    latent = args.budget // 3
    ig_model = yaml.safe_load(config_path("inverting_gradients_demo.yaml").read_text())["model"]
    ig_model["init_args"]["restarts"] = 1
    ig_model["init_args"]["priors"] = [{"class_path": "lightning_gi.objectives.TotalVariation", "init_args": {"weight": 1e-4}}]
    gias = ["--model.init_args.generator=dcgan_photos32", f"--model.init_args.checkpoint_path={gen_path}",
            "--model.init_args.pretrained=true", "--model.init_args.train_generator_if_missing=false"]
    runs = {  # name -> (recipe, attack section replacing the recipe's or None, overrides)
        "inverting_gradients": ("inverting_gradients_demo.yaml", ig_model, []),
        "gias_latent_only": ("gias_dcgan_demo.yaml", None, gias + [f"--model.init_args.latent_steps={args.budget}", "--model.init_args.param_steps=0"]),
        "gias": ("gias_dcgan_demo.yaml", None, gias + [f"--model.init_args.latent_steps={latent}", f"--model.init_args.param_steps={args.budget - latent}"]),
    }
    rows: dict[str, list] = {"inverting_gradients": [], "gias_latent_only": [], "gias_latent_phase_snapshot": [], "gias": []}
    seconds: dict[str, float] = {k: 0.0 for k in rows}
    with tempfile.TemporaryDirectory() as work:
        for b in range(args.batches):
            for name, (recipe, section, extra) in runs.items():
                overrides = [f"--trainer.max_steps={args.budget}", "--trainer.logger=false", f"--model.init_args.seed={b}", *extra]
                m, cli = run_recipe(config_path(recipe), overrides, f"{work}/{name}_{b}", edit=_victim_edit(section, b))
                seconds[name] += m["seconds"]
                s = {"psnr": m["psnr"], "ssim": m["ssim"], "mse": m["mse"], "matching_distance": m["matching_distance"]}
                rows[name].append(s)
                if name == "gias":
                    rec = cli.model.reconstruction()
                    snap = _scores(rec["latent_phase_images"], cli.datamodule.ground_truth().images)
                    snap["matching_distance"] = rec["latent_phase_matching_distance"]
                    rows["gias_latent_phase_snapshot"].append(snap)
                print(b, name, s, flush=True)
    summary = {k: _mean(v) for k, v in rows.items()}
    for k in ("inverting_gradients", "gias_latent_only", "gias"):
        summary[k]["seconds_per_step"] = seconds[k] / (args.batches * args.budget)
    return {
        "settings": {"budget_steps": args.budget, "gias_latent_steps": latent, "gias_param_steps": args.budget - latent, "batches": args.batches, "batch_size": 4, "victim": "resnet18 (untrained, 14 classes), 32x32", "generator_training_steps": args.train_steps,
                     "recipes": {"inverting_gradients": "configs/inverting_gradients_demo.yaml (TV 1e-4, 1 restart)", "gias": "configs/gias_dcgan_demo.yaml (dcgan_photos32)"}},
        "generator_fit": fit_stats,
        "generator_train_seconds": train_s,
        "per_batch": rows,
        "mean": summary,
        "gias_beats_ig": {m: summary["gias"][m] > summary["inverting_gradients"][m] for m in ("psnr", "ssim")},
        "parameter_phase_beats_latent_only": {m: summary["gias"][m] > summary["gias_latent_only"][m] for m in ("psnr", "ssim")},
    }


def part_giml(args: argparse.Namespace) -> dict[str, Any]:
    import pytorch_lightning as pl

    from lightning_gi.attacks import GIAS, GIML

    try:
        from lightning_gi.victim import GradientTasks
    except ImportError:  # before GradientTasks moved to the victim side
        from lightning_gi.attacks import GradientTasks  # type: ignore[no-redef]
    from lightning_gi.labels import SharedLabels
    from lightning_gi.victim.models import LeNet

    def tasks(seed: int, crop_seed: int, n: int, **kw: Any) -> GradientTasks:
        return GradientTasks(LeNet(num_classes=14), image_shape=(3, 32, 32), batch_size=4, num_tasks=n, task_seed=seed, model_seed=seed, crop_seed=crop_seed, crops_per_photo=8, **kw)

    if args.giml_loop == "authors":  # train_gen.py: 4 single-image gradients per task, one victim trained every 50 tasks
        loop = dict(gradients_per_task="per_image", victim_mode="sgd_every", victim_update_every=50)
        giml_kw: dict[str, Any] = {}
    else:  # the loop before issue 11: one batch-mean gradient per task on a fresh random network, constant lrs,
        # mean(z^2) penalty, TV 1e-6
        from lightning_gi.objectives import TotalVariation

        loop = dict(gradients_per_task="batch", victim_mode="reinit")
        giml_kw = dict(latent_penalty="mean_square", milestone_fractions=None, priors=[TotalVariation(weight=1e-6)])
    train = tasks(0, 1, args.meta_steps, **loop)  # crops drawn with seed 1
    held_out = tasks(10_000, 0, args.eval_tasks, victim_mode="reinit")  # other crops, other random networks
    torch.manual_seed(0)
    giml = GIML("dcgan32", generator_kwargs=dict(z_dim=64, ngf=32), latent_steps=args.inner, adapt_steps=args.inner, meta_lr=args.meta_lr, generator_out=None, **giml_kw)
    snapshots = {0: copy.deepcopy(giml.generator)}
    marks = sorted({int(round(f * args.meta_steps)) for f in (0.25, 0.5, 1.0)} - {0})
    t = time.perf_counter()
    done = 0
    for m in marks:
        trainer = pl.Trainer(max_steps=m - done, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(giml, datamodule=train)
        done = m
        snapshots[m] = copy.deepcopy(giml.generator)
        print("meta-step", m, giml.history[-1], flush=True)
    meta_s = time.perf_counter() - t
    evals: dict[int, dict[str, dict[str, float]]] = {}
    for m, gen in snapshots.items():
        evals[m] = {}
        for variant, (lat, par) in {"gias": (args.eval_steps // 2, args.eval_steps - args.eval_steps // 2), "latent_only": (args.eval_steps, 0)}.items():
            rows = []
            for i in range(args.eval_tasks):
                task = held_out.task(i)
                attack = GIAS(copy.deepcopy(gen), latent_steps=lat, param_steps=par, label_strategy=SharedLabels(), seed=i)
                attack.bind(task.inputs)
                lean_trainer(args.eval_steps).fit(attack, train_dataloaders=held_out.train_dataloader())
                rec = attack.reconstruction()
                s = _scores(rec["images"], task.ground_truth.images)
                s["matching_distance"] = rec["matching_distance"]
                rows.append(s)
            evals[m][variant] = _mean(rows)
        print("meta-step", m, evals[m], flush=True)
    return {
        "settings": {"giml_loop": args.giml_loop, "tasks": loop, "meta_steps": args.meta_steps, "meta_lr": args.meta_lr, "inner_latent_steps": args.inner, "inner_adapt_steps": args.inner, "eval_tasks": args.eval_tasks, "eval_gias_steps": args.eval_steps, "victim": ("training tasks: one sigmoid LeNet, SGD step (lr 1e-4) every 50 tasks" if args.giml_loop == "authors" else "training tasks: a random sigmoid LeNet per task") + "; held-out tasks: a random sigmoid LeNet per task; 14 classes, 32x32", "generator": "DCGAN 32x32 z64 ngf32, untrained at meta-step 0"},
        "meta_train_seconds": meta_s,
        "gias_quality_by_meta_step": {str(k): v for k, v in evals.items()},
        "inner_history_tail": giml.history[-3:],
        "rises_vs_untrained": {v: {m: evals[max(evals)][v][m] > evals[0][v][m] for m in ("psnr", "ssim")} for v in ("gias", "latent_only")},
    }


def part_rows(part: str, payload: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One part's result (as :func:`part_gias` / :func:`part_giml` return it) -> (its settings, its flat rows)."""
    rows: list[dict[str, Any]] = []
    if part == PART_A:
        for method, runs in payload["per_batch"].items():
            rows += [{"part": part, "kind": "run", "method": method, "batch": b, **r} for b, r in enumerate(runs)]
        rows += [{"part": part, "kind": "mean", "method": method, **r} for method, r in payload["mean"].items()]
        rows.append({"part": part, "kind": "generator_fit", **payload["generator_fit"],
                     "generator_train_seconds": payload["generator_train_seconds"]})
        rows.append({"part": part, "kind": "verdict", "gias_beats_ig": payload["gias_beats_ig"],
                     "parameter_phase_beats_latent_only": payload["parameter_phase_beats_latent_only"]})
    else:
        for step, variants in payload["gias_quality_by_meta_step"].items():
            rows += [{"part": part, "kind": "quality", "meta_step": int(step), "variant": v, **r} for v, r in variants.items()]
        rows.append({"part": part, "kind": "meta_train", "meta_train_seconds": payload["meta_train_seconds"]})
        n = len(payload["inner_history_tail"])
        rows += [{"part": part, "kind": "inner_history", "from_end": n - i, **h} for i, h in enumerate(payload["inner_history_tail"])]
        rows.append({"part": part, "kind": "verdict", "rises_vs_untrained": payload["rises_vs_untrained"]})
    return payload["settings"], rows


def merge_part(path: Path, part: str, payload: dict[str, Any], smoke: bool) -> Path:
    """Replace ``part``'s settings and rows in the envelope at ``path`` (kept: the other parts) and write it."""
    settings: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    if path.exists():
        old = load_result(path)
        settings = {k: v for k, v in old["settings"].items() if k != part}
        rows = [r for r in old["results"] if r.get("part") != part]
    part_settings, part_rows_ = part_rows(part, payload)
    settings[part] = {**part_settings, "smoke": smoke}
    return write_result("gias_bench", settings, rows + part_rows_, name=path.stem, out=path.parent)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "gias", "giml"), default="all")
    p.add_argument("--budget", type=int, default=240, help="optimiser steps per attack (IG and GIAS alike)")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=800)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--generator", default=str(ROOT / "checkpoints" / "gias_bench_dcgan_photos32.pt"),
                   help="part A's fitted DCGAN (git-ignored; fitted when missing or with --retrain)")
    p.add_argument("--meta-steps", type=int, default=150)
    p.add_argument("--meta-lr", type=float, default=1e-2, help="GIML outer Adam lr (paper 1e-2)")
    p.add_argument("--inner", type=int, default=30, help="GIML inner latent and adaptation steps")
    p.add_argument("--eval-tasks", type=int, default=3)
    p.add_argument("--eval-steps", type=int, default=60)
    p.add_argument("--giml-loop", choices=("authors", "previous"), default="authors", help="authors: train_gen.py's loop (default); previous: the loop before issue 11")
    p.add_argument("--name", default="gias_bench")
    add_common_arguments(p)
    args = p.parse_args(argv)
    smoke_dir = tempfile.TemporaryDirectory() if args.smoke else None
    if smoke_dir is not None:  # a generator fitted for 2 steps in a temporary file (never the real prior's file)
        args.budget, args.batches, args.train_steps, args.retrain = 3, 1, 2, True
        args.generator = str(Path(smoke_dir.name) / "smoke_dcgan_photos32.pt")
        args.meta_steps, args.inner, args.eval_tasks, args.eval_steps = 4, 2, 1, 2
    single_thread()
    out_path = results_dir(args.results_dir, smoke=args.smoke) / f"{args.name}.json"
    if args.part in ("all", "gias"):
        merge_part(out_path, PART_A, part_gias(args), args.smoke)
    if args.part in ("all", "giml"):
        key = "giml" if args.meta_lr == 1e-2 else f"giml_meta_lr_{args.meta_lr:g}"
        if args.giml_loop == "authors":
            key = f"giml_authors_loop_meta_lr_{args.meta_lr:g}"
        merge_part(out_path, key, part_giml(args), args.smoke)
    if smoke_dir is not None:
        smoke_dir.cleanup()


if __name__ == "__main__":
    main()
