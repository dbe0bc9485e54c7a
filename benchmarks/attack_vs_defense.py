"""Attack x defense-strength grid: how much each client-side defense hurts each attack.

For every attack, defense family and strength, and every private case (a seeded untrained victim and
one bundled photograph, batch 1 as in the DLG paper's defense study), the client's gradient is
captured with the defense, the attack runs, and the reconstruction is scored (PSNR, SSIM, LPIPS when
its backbone file is on disk, label accuracy, "recovered" = MSE < 1e-3). Outputs in
benchmarks/results/ (or --out):

    attack_vs_defense.json  one row per run (the JSON envelope of benchmarks/common.py)
    attack_vs_defense.csv   the same rows
    attack_vs_defense.md    mean over cases per (attack, defense, strength)
    attack_vs_defense.png   PSNR / LPIPS (SSIM without LPIPS) / label accuracy vs defense strength

Default grid (CPU, 1 thread: about 8 minutes unloaded, 16 on a busy 2-core machine): sigmoid LeNet 32x32, iDLG and DLG (100 L-BFGS steps) and Inverting
Gradients (1,000 signed-Adam steps), Gaussian noise std 0/1e-4/1e-3/1e-2/1e-1, top-k
pruning 0/20/50/90/99%, 1 case (--cases for more). ``--paper`` selects the paper-scale grid (GPU): 300 L-BFGS steps,
Inverting Gradients 4,000 steps, Gaussian and Laplace noise, relative Laplace (0.1 x max per layer as
in the stepwise paper), pruning 0..99%, fp16/bf16/int8, 8 cases.

Every run is a shipped recipe run through ``lightning_gi.cli.run``: the attack section of
configs/idlg_lenet.yaml, configs/dlg_lenet.yaml or configs/inverting_gradients_demo.yaml, on the victim section of
configs/idlg_lenet.yaml with the grid's model, dataset, case (``model_seed`` = ``batch_seed``) and defenses
(``benchmarks.common.run_recipe(edit=...)``). Scores come from each run's ``metrics.json``.

    python -m benchmarks.attack_vs_defense                      # default grid
    python -m benchmarks.attack_vs_defense --paper --device cuda
    python -m benchmarks.attack_vs_defense --attacks idlg --families prune --cases 1 --steps 20
    python -m benchmarks.attack_vs_defense --smoke              # seconds
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/attack_vs_defense.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import copy
import csv
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from benchmarks.common import add_common_arguments, config_path, environment, results_dir, run_recipe, single_thread, write_result

RECIPES = {"idlg": "idlg_lenet.yaml", "dlg": "dlg_lenet.yaml", "ig": "inverting_gradients_demo.yaml"}

# family -> (label of the strength axis, default strengths, paper strengths, builder)
FAMILIES: dict[str, tuple[str, list[float], list[float]]] = {
    "noise": ("Gaussian noise std", [0.0, 1e-4, 1e-3, 1e-2, 1e-1], [0.0, 1e-4, 1e-3, 1e-2, 1e-1]),
    "laplace": ("Laplace noise scale b", [0.0, 1e-4, 1e-3, 1e-2, 1e-1], [0.0, 1e-4, 1e-3, 1e-2, 1e-1]),
    "laplace_rel": ("Laplace scale / max|g| per layer", [0.0, 0.01, 0.1], [0.0, 0.01, 0.1, 0.3]),
    "prune": ("pruned fraction (top-k per layer)", [0.0, 0.2, 0.5, 0.9, 0.99], [0.0, 0.01, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99]),
    "precision": ("bits (32 = none; 16 = fp16, 8 = int8)", [32, 16, 8], [32, 16, 8]),
    "clip": ("global clip norm (inf = none)", [math.inf, 1.0, 0.1], [math.inf, 10.0, 1.0, 0.1, 0.01]),
}
DEFAULT_FAMILIES = ["noise", "prune"]
PAPER_FAMILIES = ["noise", "laplace", "laplace_rel", "prune", "precision"]


def build_defenses(family: str, strength: float, seed: int) -> list[dict[str, Any]]:
    """The defense list of the victim section (class_path / init_args) for one grid cell."""
    d = "lightning_gi.victim.defenses."
    if family == "noise":
        return [{"class_path": d + "GaussianNoise", "init_args": {"std": strength, "seed": seed}}] if strength > 0 else []
    if family == "laplace":
        return [{"class_path": d + "LaplaceNoise", "init_args": {"scale": strength, "seed": seed}}] if strength > 0 else []
    if family == "laplace_rel":
        return [{"class_path": d + "LaplaceNoise", "init_args": {"scale": strength, "relative": True, "seed": seed}}] if strength > 0 else []
    if family == "prune":
        return [{"class_path": d + "TopKPruning", "init_args": {"prune_ratio": strength}}] if strength > 0 else []
    if family == "precision":
        fmt = {32: None, 16: "fp16", 8: "int8"}[int(strength)]
        return [{"class_path": d + "LowPrecision", "init_args": {"precision": fmt}}] if fmt else []
    if family == "clip":
        return [{"class_path": d + "GradientClipping", "init_args": {"max_norm": strength}}] if math.isfinite(strength) else []
    raise ValueError(f"unknown defense family {family!r}; choose from {sorted(FAMILIES)}")


def victim_model(name: str, num_classes: int, image_size: int, channels: int) -> dict[str, Any]:
    """The victim network as a config section."""
    if name == "lenet":
        return {"class_path": "lightning_gi.victim.LeNet",
                "init_args": {"num_classes": num_classes, "in_channels": channels, "image_size": image_size}}
    return {"class_path": "lightning_gi.victim.torchvision_classifier",
            "init_args": {"name": name, "num_classes": num_classes, "in_channels": channels}}


def run_one(attack: str, case: int, defenses: list[dict[str, Any]], steps: int, args: argparse.Namespace,
            work: str) -> dict[str, Any]:
    """One grid cell: the attack's recipe on the shared victim section with ``defenses``; scores from metrics.json."""
    data = copy.deepcopy(yaml.safe_load(config_path(RECIPES["idlg"]).read_text())["data"])
    data["init_args"].update({
        "model": victim_model(args.model, args.num_classes, args.image_size, args.channels), "model_seed": case,
        "image_shape": [args.channels, args.image_size, args.image_size], "defenses": defenses})
    data["init_args"]["source"]["init_args"].update({
        "dataset": args.dataset, "data_root": args.data_root, "batch_size": 1, "batch_seed": case})

    def edit(cfg: dict[str, Any]) -> None:
        cfg["data"] = data
        cfg["model"]["init_args"]["seed"] = case
        if attack == "ig":
            cfg["model"]["init_args"]["label_strategy"] = {"class_path": "lightning_gi.labels.IDLGLabels"}

    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    overrides = [f"--trainer.max_steps={steps}", "--trainer.logger=false", f"--trainer.accelerator={accelerator}"]
    m, _ = run_recipe(config_path(RECIPES[attack]), overrides, f"{work}/{attack}_{len(list(Path(work).iterdir()))}", edit=edit)
    return {
        "psnr": m["psnr"],
        "ssim": m["ssim"],
        "mse": m["mse"],
        "lpips": m["lpips"] if m["lpips"] is not None else math.nan,
        "label_accuracy": m["label_accuracy"],
        "recovered": float(m["mse"] < 1e-3),
        "matching_distance": m["matching_distance"],
        "seconds": m["seconds"],
    }


def mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan
    finite = [min(v, 100.0) for v in vals]  # PSNR of a perfect reconstruction is inf: cap at 100 dB
    return sum(finite) / len(finite)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys: list[tuple[str, str, float]] = []
    for r in rows:
        k = (r["attack"], r["defense"], r["strength"])
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        sel = [r for r in rows if (r["attack"], r["defense"], r["strength"]) == k]
        out.append({
            "attack": k[0], "defense": k[1], "strength": k[2], "runs": len(sel),
            **{m: mean([r[m] for r in sel]) for m in ("psnr", "ssim", "lpips", "label_accuracy", "recovered", "seconds")},
        })
    return out


def fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_markdown(path: Path, summary: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    lines = [
        "# Attack x defense strength",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "Means over cases (PSNR capped at 100 dB; recovered = fraction of runs with MSE < 1e-3).",
        "",
        "| attack | defense | strength | PSNR (dB) | SSIM | LPIPS | label acc | recovered | s/run | runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['attack']} | {s['defense']} | {s['strength']:g} | {fmt(s['psnr'])} | {fmt(s['ssim'], 3)} | "
            f"{fmt(s['lpips'], 3)} | {fmt(s['label_accuracy'])} | {fmt(s['recovered'])} | {fmt(s['seconds'], 1)} | {s['runs']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, summary: list[dict[str, Any]], families: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_lpips = any(not math.isnan(s["lpips"]) for s in summary)
    metrics = [("psnr", "PSNR (dB)"), ("lpips", "LPIPS") if have_lpips else ("ssim", "SSIM (LPIPS n/a)"), ("label_accuracy", "label accuracy")]
    fig, axes = plt.subplots(len(families), len(metrics), figsize=(4.2 * len(metrics), 3.2 * len(families)), squeeze=False)
    attacks = list(dict.fromkeys(s["attack"] for s in summary))
    for i, fam in enumerate(families):
        xlabel = FAMILIES[fam][0]
        for j, (key, title) in enumerate(metrics):
            ax = axes[i][j]
            for a in attacks:
                pts = [(s["strength"], s[key]) for s in summary if s["attack"] == a and s["defense"] == fam]
                if fam == "clip":  # plot "none" at the right edge
                    finite = [x for x, _ in pts if math.isfinite(x)]
                    edge = 10 * max(finite) if finite else 1.0
                    pts = [(x if math.isfinite(x) else edge, y) for x, y in pts]
                pts.sort()
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=a)
            if fam in ("noise", "laplace", "laplace_rel"):
                ax.set_xscale("symlog", linthresh=1e-4)
            elif fam == "clip":
                ax.set_xscale("log")
            if key in ("label_accuracy", "ssim"):
                ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel(xlabel)
            ax.set_title(f"{title} - {fam}")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="paper-scale grid (use a GPU)")
    parser.add_argument("--attacks", nargs="+", default=None, help="subset of: idlg dlg ig (default: all)")
    parser.add_argument("--families", nargs="+", default=None, choices=sorted(FAMILIES), help="defense families")
    parser.add_argument("--strengths", nargs="+", type=float, default=None, help="override the strengths (one family)")
    parser.add_argument("--cases", type=int, default=None, help="private cases (victim seed + image) per cell")
    parser.add_argument("--steps", type=int, default=None, help="L-BFGS steps for DLG/iDLG")
    parser.add_argument("--ig-steps", type=int, default=None, help="Adam steps for Inverting Gradients")
    parser.add_argument("--model", default="lenet", help="lenet or a torchvision model name (resnet18, ...)")
    parser.add_argument("--dataset", default="photographs", help="photographs, digits, cifar10, ... (see victim.data)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help="output directory (same as --results-dir)")
    parser.add_argument("--name", default="attack_vs_defense", help="output file stem")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.attacks, args.families, args.strengths, args.cases, args.steps = ["idlg"], ["prune"], [0.0, 0.5], 1, 2
    single_thread()

    from lightning_gi.metrics import load_lpips

    families = args.families or (PAPER_FAMILIES if args.paper else DEFAULT_FAMILIES)
    if args.strengths is not None and len(families) != 1:
        parser.error("--strengths needs exactly one --families entry")
    cases = args.cases if args.cases is not None else (8 if args.paper else 1)
    steps = args.steps if args.steps is not None else (300 if args.paper else 100)
    ig_steps = args.ig_steps if args.ig_steps is not None else (4000 if args.paper else 1000)
    names = args.attacks or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown attacks {unknown}; available: {sorted(RECIPES)}")

    lpips_model = load_lpips("alex", device=args.device)  # only to say whether LPIPS is scored (metrics.json)
    out = results_dir(args.out or args.results_dir, smoke=args.smoke)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": args.model, "dataset": args.dataset, "image_size": args.image_size, "batch": 1, "cases": cases,
        "lbfgs_steps": steps, "ig_steps": ig_steps, "device": args.device,
        "lpips": "alex" if lpips_model is not None else "unavailable (no backbone file)",
        "attacks": names, "families": families, "smoke": args.smoke,
        "recipes": {n: f"configs/{RECIPES[n]}" for n in names},
    }
    print("settings:", settings, flush=True)

    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    undefended: dict[tuple[int, str], dict[str, Any]] = {}
    work = tempfile.TemporaryDirectory()
    for case in range(cases):
        for fam in families:
            strengths = args.strengths if args.strengths is not None else FAMILIES[fam][2 if args.paper else 1]
            for strength in strengths:
                for name in names:
                    defenses = build_defenses(fam, float(strength), seed=case)
                    n_steps = ig_steps if name == "ig" else steps
                    if not defenses and (case, name) in undefended:  # strength 0 of every family: run once
                        res = dict(undefended[(case, name)])
                    else:
                        res = run_one(name, case, defenses, n_steps, args, work.name)
                        if not defenses:
                            undefended[(case, name)] = res
                    row = {"attack": name, "defense": fam, "strength": float(strength), "case": case, **res}
                    rows.append(row)
                    print(
                        f"[{time.perf_counter() - t_start:7.1f}s] case {case} {name:5s} {fam:11s} {strength:<8g} "
                        f"PSNR {res['psnr']:6.2f}  SSIM {res['ssim']:.3f}  label {res['label_accuracy']:.0f}  "
                        f"({res['seconds']:.1f}s)",
                        flush=True,
                    )

    work.cleanup()
    stem = out / args.name
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    settings["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_result("attack_vs_defense", settings, rows, name=args.name, out=out, env=environment(args.device))
    write_markdown(Path(f"{stem}.md"), summary, settings)
    write_plot(Path(f"{stem}.png"), summary, families)
    print(Path(f"{stem}.md").read_text())
    print(f"wrote {stem}.csv, {stem}.md, {stem}.png")
    return rows


if __name__ == "__main__":
    main()
