"""Issue-5 bar: label COUNTS of batches with repeated labels (Ye et al. 2024, Stage I).

Private batches are drawn from the bundled real photographs with repeated labels (8 images from 3 classes,
16 from 5, 32 from 8, 64 from 10), on a torchvision ResNet-18 with a 1000-class head (as ImageNet: the
softmax of an early-training network is ~1/1000 per class, the paper's assumption) in two states:

* ``untrained``: random init, BN running statistics from bundled photographs (eval mode);
* ``trained``: the same network briefly trained (SGD) on bundled photographs.

Strategies (exact-multiset accuracy = the recovered multiset of labels equals the true one):

* ``evolutionary``: :class:`EvolutionaryLabelCounts`, auxiliary statistics from 40 crops of the bundled
  photographs (other crops than the batch's, seed 1); ``evolutionary_textures``: statistics from
  scikit-image images that are not among the photographs (disjoint public data);
* ``coarse_uniform`` / ``coarse_magnitude``: the coarse classes with equal counts / counts proportional to
  the negative row means (no auxiliary data);
* ``idlg_batch``: IDLGLabels' batch rule (the N most negative rows, distinct labels by construction).

Also reported: whether the coarse class SET is right, the mean L1 error of the counts, and (evolutionary
rows) ``fitness_found_ge_truth``: the fraction of batches where the coarse classes were right and the counts
found have a fitness at least that of the TRUE counts -- when it is 1 while ``exact`` is low, the search is
doing its job and the paper's feature model (sorted rows ~ n_c * mean sorted feature) is what misses.

Label strategies only (no attack runs, no recipe to reuse). Rows: one per (model state, batch case, strategy),
with the state's training figures.

    OMP_NUM_THREADS=1 python -m benchmarks.stepwise_labels [--size 32] [--trials 10] [--train-steps 150] [--smoke]
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/stepwise_labels.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time

import torch

from benchmarks.common import add_common_arguments, single_thread, write_result

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
CASES = [(8, 3), (16, 5), (32, 8), (64, 10)]


def briefly_trained(model, photos, steps: int, seed: int = 0):
    """SGD (lr 0.01, momentum 0.9, batch 32) on the bundled photographs; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.tensor(MEAN).view(-1, 1, 1)
    s = torch.tensor(STD).view(-1, 1, 1)
    x_all = (photos.images - m) / s
    y_all = torch.tensor(photos.targets)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y_all), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_all[:256]).argmax(1) == y_all[:256]).float().mean())
    return model, float(loss.detach()), acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--cases", default=",".join(f"{n}/{k}" for n, k in CASES), help="N/K batch cases, comma-separated")
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.smoke:
        args.size, args.trials, args.train_steps, args.cases = 32, 1, 1, "8/3"
    cases = [tuple(int(v) for v in c.split("/")) for c in args.cases.split(",")]
    single_thread()

    from lightning_gi.labels import CoarseLabelCounts, EvolutionaryLabelCounts, IDLGLabels, classifier_gradients
    from lightning_gi.labels.evolutionary import _row_matrix, count_fitness
    from lightning_gi.observation import capture_observation
    from lightning_gi.victim.calibration import bn_calibrated_classifier
    from lightning_gi.victim.data import BundledPhotographs, select_batch

    photos = BundledPhotographs(image_size=args.size, crops_per_photo=16)
    train_photos = BundledPhotographs(image_size=args.size, crops_per_photo=16, seed=3, pool="public")  # disjoint from the attacked photographs
    m = torch.tensor(MEAN).view(-1, 1, 1)
    s = torch.tensor(STD).view(-1, 1, 1)
    out_rows: list[dict] = []
    for state in ("untrained", "trained"):
        model = bn_calibrated_classifier(args.model, 1000, image_size=args.size, mean=MEAN, std=STD, seed=0)
        info = {}
        if state == "trained":
            model, loss, acc = briefly_trained(model, train_photos, args.train_steps)
            info = {"train_steps": args.train_steps, "final_loss": loss, "train_accuracy": acc}
        strategies = {
            "evolutionary": EvolutionaryLabelCounts(image_size=args.size, mean=MEAN, std=STD),
            "evolutionary_textures": EvolutionaryLabelCounts(image_size=args.size, mean=MEAN, std=STD, aux_source="textures"),
            "coarse_uniform": CoarseLabelCounts("uniform"),
            "coarse_magnitude": CoarseLabelCounts("magnitude"),
            "idlg_batch": IDLGLabels(),
        }
        for name, strat in strategies.items():
            if isinstance(strat, EvolutionaryLabelCounts):
                strat.statistics(model)  # once per model, not timed per batch
        for n, k in cases:
            row = {name: {"exact": 0, "class_set": 0, "count_l1": 0.0, "seconds": 0.0, "fitness_found_ge_truth": 0} for name in strategies}
            for trial in range(args.trials):
                x, y, _ = select_batch(photos, n, seed=1000 * n + trial, label_mode="repeated", num_distinct=k)
                obs = capture_observation(model, (x - m) / s, y)
                true_counts = torch.bincount(y, minlength=1000)
                for name, strat in strategies.items():
                    t0 = time.perf_counter()
                    labels = strat(obs, model)
                    row[name]["seconds"] += time.perf_counter() - t0
                    counts = torch.bincount(labels, minlength=1000)
                    row[name]["exact"] += int(torch.equal(counts, true_counts))
                    row[name]["class_set"] += int(torch.equal(counts > 0, true_counts > 0))
                    row[name]["count_l1"] += float((counts - true_counts).abs().sum())
                    if isinstance(strat, EvolutionaryLabelCounts):  # is a miss the search's or the model's?
                        r = strat.last_result
                        st = strat.statistics(model)
                        rows = _row_matrix(classifier_gradients(obs, model)[0], r.classes, st.positions)
                        hbar = st.mean_sorted.double()[st.positions].numpy()
                        truth = true_counts[r.classes].numpy()
                        ok = truth.min() >= 1 and truth.sum() == n
                        row[name]["fitness_found_ge_truth"] += int(
                            bool(ok) and r.fitness >= float(count_fitness(truth, rows, hbar)) - 1e-12
                        )
            for name in strategies:
                r = row[name]
                r["exact"] /= args.trials
                r["class_set"] /= args.trials
                r["count_l1"] /= args.trials
                r["fitness_found_ge_truth"] /= args.trials
                r["seconds"] /= args.trials
            out_rows += [{"state": state, "batch_size": n, "num_distinct": k, "strategy": name, **r, **info}
                         for name, r in row.items()]
            print(state, f"N={n} K={k}", {name: (r["exact"], r["class_set"], round(r["count_l1"], 2)) for name, r in row.items()}, flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "results_dir"}
    write_result("stepwise_labels", settings, out_rows, name=f"stepwise_labels_{args.model}_{args.size}px", out=args.results_dir)


if __name__ == "__main__":
    main()
