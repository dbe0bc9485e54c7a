"""Issue 12: label COUNTS of batches with duplicated labels, every strategy, three victim states.

Data: the bundled photographs (14 classes: one photograph each, cut into crops) and scikit-learn's digits
(10 classes, as 3-channel images), 24 classes in all, at the victim's image size. Within each class the
items are split by index: every 4th item is ATTACKED, the others are used only for TRAINING the victim,
so the attacked images are never trained on (for the photographs, training crops are other crops of the
same photograph: disjoint images, overlapping content).

Victims (built with ``num_classes`` directly under ``torch.manual_seed``, attacked in eval mode):
``lenet32`` (sigmoid LeNet), ``resnet18_32``, ``resnet18_64``, ``resnet34_64``; head size ``--num-classes``
(default 100: CIFAR-100-like; the batch's classes are a subset of the 24 data classes). States:

* ``untrained``: the architecture's own initialisation;
* ``early``: ``--early-steps`` SGD steps (batch 32, lr ``--early-lr`` = 0.001, momentum 0.9) on the
  training items;
* ``converged``: ``--converged-steps`` SGD steps (lr 0.05, momentum 0.9) on the training items; attacked on held-out
  items of classes it learned.

Batches: N/distinct classes = 8/3, 16/5, 32/8, 64/10, 128/10, 256/20 (``select_batch(label_mode=
"repeated")``; when a class has fewer attacked items than its count, items repeat). Per case and strategy:
``exact`` (rate of batches whose recovered label multiset equals the true one) and ``labels_off`` (mean
number of labels to change: half the L1 distance of the count vectors); per victim state ``p_true`` (mean
softmax probability of the true class on the attacked batches).

Strategies ``calibrated`` (:class:`~lightning_gi.labels.CalibratedCounts`) and ``auto_public`` (``auto`` with
public images: the strategy chosen by rehearsal) get labelled public images disjoint from the attacked ones: with
``--public-split heldout`` (default) every 4th item (k % 4 == 2), which the victim never trains on; with
``training`` the training items (the trained victims have seen them; the split of results/labels.json).

Label strategies only (no attack runs, no recipe to reuse): the victims and observations are built here.
Rows: one per (victim, state, batch case, strategy), with the victim state's training loss and time.

    OMP_NUM_THREADS=1 python -m benchmarks.labels --quick            # reduced grid (see --help)
    OMP_NUM_THREADS=1 python -m benchmarks.labels --victims resnet18_32 resnet34_64 --seeds 10
    OMP_NUM_THREADS=1 python -m benchmarks.labels --smoke            # seconds
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/labels.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from benchmarks.common import add_common_arguments, single_thread, write_result

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
CASES = [(8, 3), (16, 5), (32, 8), (64, 10), (128, 10), (256, 20)]
VICTIMS = {  # name -> (architecture, image size, normalisation)
    "lenet32": ("lenet", 32, HALF),
    "resnet18_32": ("resnet18", 32, IMAGENET),
    "resnet18_64": ("resnet18", 64, IMAGENET),
    "resnet34_64": ("resnet34", 64, IMAGENET),
}
STRATEGIES = ["auto", "ilrg", "ilrg_refined", "bias_counts", "llg", "wainakh", "bias-corrected", "yin", "evolutionary",
              "calibrated", "auto_public"]


class Items(Dataset):
    """Images [n, 3, s, s] in [0, 1] with integer targets (``targets``/``num_classes`` as select_batch expects)."""

    def __init__(self, images: torch.Tensor, targets: list[int], num_classes: int) -> None:
        self.images, self.targets, self.num_classes = images, targets, num_classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def split_data(image_size: int, crops_per_photo: int, public_split: str = "heldout") -> tuple[Items, Items, Items]:
    """(attacked, training, public) items: item ``k`` of each class is attacked when ``k % 4 == 0``; with
    ``public_split="heldout"`` the items with ``k % 4 == 2`` are the public ones (never trained on, never attacked)
    and the rest train the victim; with ``"training"`` the public items ARE the training items."""
    from lightning_gi.victim.data import BundledDigits, BundledPhotographs

    photos = BundledPhotographs(image_size=image_size, crops_per_photo=crops_per_photo)
    digits = BundledDigits(image_size=image_size, channels=3)
    images = torch.cat([photos.images, digits.images])
    targets = list(photos.targets) + [t + photos.num_classes for t in digits.targets]
    seen: dict[int, int] = {}
    attack, train, public = [], [], []
    for i, t in enumerate(targets):
        k = seen.get(t, 0)
        seen[t] = k + 1
        (attack if k % 4 == 0 else public if (k % 4 == 2 and public_split == "heldout") else train).append(i)
    c = photos.num_classes + digits.num_classes
    pick = lambda idx: Items(images[idx], [targets[i] for i in idx], c)  # noqa: E731
    return pick(attack), pick(train), pick(public if public_split == "heldout" else train)


def build_victim(arch: str, size: int, num_classes: int, seed: int):
    from lightning_gi.victim import LeNet, torchvision_classifier

    torch.manual_seed(seed)
    if arch == "lenet":
        return LeNet(num_classes=num_classes, image_size=size)
    return torchvision_classifier(arch, num_classes=num_classes)


def train_victim(model, train: Items, steps: int, lr: float, norm, seed: int) -> dict[str, float]:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    targets = torch.tensor(train.targets)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(len(train), (32,), generator=gen)
        loss = F.cross_entropy(model((train.images[idx] - mean) / std), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {"final_train_loss": float(loss.detach())}


def make_strategy(name: str, size: int, norm, public: "Items | None" = None):
    from lightning_gi.labels import CalibratedCounts, label_strategy

    if name in ("calibrated", "auto_public"):  # labelled public images of the victim's classes (never attacked)
        if public is None:
            raise ValueError(f"the {name} strategy needs public images")
        if name == "auto_public":
            auto = label_strategy("auto", image_size=size, mean=norm[0], std=norm[1])
            return auto.use_public_images(public.images, torch.tensor(public.targets))
        return CalibratedCounts.from_tensors(public.images, torch.tensor(public.targets), mean=norm[0], std=norm[1])

    if name == "ilrg_refined":
        return label_strategy("ilrg", refine_steps=6)
    if name == "wainakh":
        return label_strategy("wainakh", input_shape=(3, size, size), cache=True)
    if name in ("evolutionary", "auto"):
        return label_strategy(name, image_size=size, mean=norm[0], std=norm[1])
    return label_strategy(name)


def counts(labels: torch.Tensor, c: int) -> np.ndarray:
    return np.bincount(labels.numpy(), minlength=c)[:c]


def run_state(victim: str, state: str, model, attack: Items, args, norm, size, public: "Items | None" = None) -> list[dict[str, Any]]:
    from lightning_gi.observation import capture_observation
    from lightning_gi.victim.data import select_batch

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    strategies = {name: make_strategy(name, size, norm, public) for name in args.strategies}
    rows = []
    p_true_all = []
    for n, k in args.cases:
        stats = {name: {"exact": [], "off": [], "seconds": 0.0, "errors": 0} for name in strategies}
        chosen: dict[str, dict[str, int]] = {}
        confidence: list[float] = []  # auto's bias-gradient confidence (its estimate of p_true)
        for seed in range(args.seeds):
            x, y, _ = select_batch(attack, n, seed=1000 * n + seed, label_mode="repeated", num_distinct=k)
            x = (x - mean) / std
            with torch.no_grad():
                p_true_all.append(float(torch.softmax(model(x), 1).gather(1, y[:, None]).mean()))
            obs = capture_observation(model, x, y)
            truth = counts(y, args.num_classes)
            for name, strategy in strategies.items():
                if name == "yin" and n > args.num_classes:
                    continue
                t0 = time.perf_counter()
                try:
                    got = counts(strategy(obs, model), args.num_classes)
                except Exception as err:  # noqa: BLE001 - a strategy failing is a result
                    stats[name]["errors"] += 1
                    print(f"  {name} failed: {type(err).__name__}: {err}")
                    continue
                stats[name]["seconds"] += time.perf_counter() - t0
                stats[name]["exact"].append(bool((got == truth).all()))
                stats[name]["off"].append(float(np.abs(got - truth).sum() / 2))
                if name in ("auto", "auto_public"):
                    chosen.setdefault(name, {})
                    chosen[name][strategy.chosen_name] = chosen[name].get(strategy.chosen_name, 0) + 1
                if name == "auto":
                    if "bias_gradient_confidence" in strategy.diagnostics:
                        confidence.append(float(strategy.diagnostics["bias_gradient_confidence"]))
        for name, s in stats.items():
            if not s["exact"] and not s["errors"]:
                continue
            row = {
                "victim": victim, "state": state, "batch_size": n, "num_distinct": k, "strategy": name,
                "trials": len(s["exact"]), "errors": s["errors"],
                "exact": float(np.mean(s["exact"])) if s["exact"] else None,
                "labels_off": float(np.mean(s["off"])) if s["off"] else None,
                "seconds_per_call": s["seconds"] / max(1, len(s["exact"])),
            }
            if name in chosen:
                row["auto_chose"] = chosen[name]
            if name == "auto":
                if confidence:
                    row["auto_bias_gradient_confidence"] = float(np.mean(confidence))
            rows.append(row)
            print(f"{victim:12s} {state:9s} N={n:3d}/{k:2d} {name:15s} exact={row['exact']} off={row['labels_off']}", flush=True)
    for r in rows:
        r["p_true"] = float(np.mean(p_true_all))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lenet32 + resnet18_32, 3 seeds, untrained+early+converged")
    parser.add_argument("--victims", nargs="+", default=list(VICTIMS), choices=list(VICTIMS))
    parser.add_argument("--states", nargs="+", default=["untrained", "early", "converged"])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--min-batch", type=int, default=1, help="skip the cases with a smaller batch")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--early-steps", type=int, default=200)
    parser.add_argument("--early-lr", type=float, default=0.001)
    parser.add_argument("--converged-steps", type=int, default=1500)
    parser.add_argument("--crops-per-photo", type=int, default=32)
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--out", default="labels", help="name of the JSON file")
    parser.add_argument("--public-split", choices=["heldout", "training"], default="heldout",
                        help="public images of calibrated/auto_public: items never trained on (default) or the training items")
    parser.add_argument("--victim-cache", default=None,
                        help="directory of trained victim states (reused when the training settings match, written otherwise)")
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.smoke:
        args.victims, args.states, args.seeds, args.max_batch = ["lenet32"], ["untrained"], 1, 8
        args.strategies, args.crops_per_photo = ["ilrg", "llg"], 4
    if args.quick:
        args.victims = [v for v in args.victims if v in ("lenet32", "resnet18_32")] or ["resnet18_32"]
        args.seeds = min(args.seeds, 3)
        args.converged_steps = min(args.converged_steps, 600)
    args.cases = [c for c in CASES if args.min_batch <= c[0] <= args.max_batch]
    single_thread()
    results: list[dict[str, Any]] = []
    training: dict[str, Any] = {}
    t_start = time.time()
    for victim in args.victims:
        arch, size, norm = VICTIMS[victim]
        attack, train, public = split_data(size, args.crops_per_photo, args.public_split)
        if args.num_classes < attack.num_classes:
            raise SystemExit(f"--num-classes must be >= {attack.num_classes} (the data's classes)")
        for state in args.states:
            model = build_victim(arch, size, args.num_classes, args.model_seed)
            t0 = time.time()
            steps, lr = {"early": (args.early_steps, args.early_lr), "converged": (args.converged_steps, 0.05)}.get(state, (0, 0.0))
            cached = None
            if args.victim_cache and steps:
                cached = Path(args.victim_cache) / f"{victim}_{args.num_classes}_{args.model_seed}_{steps}_{lr}_{args.crops_per_photo}_{args.public_split}.pt"
            if cached is not None and cached.exists():
                blob = torch.load(cached, weights_only=True)
                model.load_state_dict(blob["state"])
                training[f"{victim}/{state}"] = {"final_train_loss": float(blob["final_train_loss"]), "cached": True}
            elif steps:
                training[f"{victim}/{state}"] = train_victim(model, train, steps, lr, norm, 1)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"state": model.state_dict(), **training[f"{victim}/{state}"]}, cached)
            model.eval()
            training.setdefault(f"{victim}/{state}", {})["train_seconds"] = time.time() - t0
            results += run_state(victim, state, model, attack, args, norm, size, public=public)
            write(args, results, training, time.time() - t_start, partial=True)
    write(args, results, training, time.time() - t_start, partial=False)


def write(args, results, training, seconds, partial: bool) -> None:
    """The envelope; each row carries its victim state's training figures (``final_train_loss``, ``train_seconds``)."""
    rows = [{**r, **training.get(f"{r['victim']}/{r['state']}", {})} for r in results]
    write_result("labels", settings(args, seconds, partial), rows, name=args.out, out=args.results_dir, quiet=partial)


def settings(args, seconds, partial: bool) -> dict[str, Any]:
    return {
        "quick": args.quick, "victims": args.victims, "states": args.states, "seeds": args.seeds,
        "cases": args.cases, "num_classes_head": args.num_classes, "data_classes": 24,
        "strategies": args.strategies, "early_steps": args.early_steps, "early_lr": args.early_lr, "converged_lr": 0.05, "converged_steps": args.converged_steps,
        "crops_per_photo": args.crops_per_photo, "model_seed": args.model_seed, "victim_mode": "eval",
        "loss_reduction": "mean", "public_split": args.public_split,
        "split": ("every 4th item of each class attacked (k % 4 == 0), "
                  + ("k % 4 == 2 public (never trained on), the rest training" if args.public_split == "heldout"
                     else "the rest training and public")),
        "partial": partial, "wall_seconds": round(seconds, 1), "smoke": args.smoke,
        "description": "labels (issue 12): exact-multiset rate and labels off per strategy, victim and state",
    }


if __name__ == "__main__":
    main()
