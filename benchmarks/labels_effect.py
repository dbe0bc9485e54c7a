"""Effect of the label strategy on the images: Inverting Gradients at batch 8 with duplicated labels.

Same observation, same initial dummies, same budget; only the labels differ: each strategy's recovered labels
vs the true labels (``SharedLabels``, the client sending its labels). Victim: the untrained ConvNet with a
flattened head (the IG demo's victim, biased head), 32x32 private bundled photographs, 8 images of 3 classes.
PSNR after the Hungarian matching of lightning_gi.metrics. JSON: benchmarks/results/labels_effect.json.

    OMP_NUM_THREADS=1 python benchmarks/labels_effect.py --seeds 2 --steps 300
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import lean_trainer, single_thread, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--distinct", type=int, default=3)
    args = parser.parse_args(argv)
    single_thread()
    import torch

    from lightning_gi.attacks import InvertingGradients
    from lightning_gi.labels import LLG, AutoLabels, IDLGLabels, SharedLabels
    from lightning_gi.metrics import reconstruction_metrics
    from lightning_gi.victim import ConvNet, TensorBatchVictim
    from lightning_gi.victim.data import BundledPhotographs, select_batch

    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    photos = BundledPhotographs(image_size=32, crops_per_photo=8)
    strategies = {"true (shared)": SharedLabels, "auto": lambda: AutoLabels(image_size=32, mean=mean, std=std),
                  "idlg": IDLGLabels, "llg": LLG}
    results = []
    for seed in range(args.seeds):
        images, labels, _ = select_batch(photos, args.batch, seed=seed, label_mode="repeated", num_distinct=args.distinct)
        for name, make in strategies.items():
            torch.manual_seed(seed)
            model = ConvNet(num_classes=14, image_size=32).eval()
            dm = TensorBatchVictim(model, images, labels, share_labels=name.startswith("true"), mean=mean, std=std)
            attack = InvertingGradients(label_strategy=make(), seed=seed, restarts=1)
            start = time.perf_counter()
            lean_trainer(args.steps).fit(attack, dm)
            rec = attack.reconstruction()
            m = reconstruction_metrics(rec["images"], images, rec["labels"], labels)
            row = {"seed": seed, "strategy": name, "true_labels": sorted(labels.tolist()),
                   "recovered_labels": sorted(rec["labels"].tolist()), "label_accuracy": m["label_accuracy"],
                   "psnr": m["psnr"], "ssim": m["ssim"], "seconds": time.perf_counter() - start}
            print(f"seed {seed} {name:14s} labels {row['label_accuracy']:.2f} PSNR {m['psnr']:.2f} SSIM {m['ssim']:.3f}", flush=True)
            results.append(row)
    summary = {}
    for name in strategies:
        rows = [r for r in results if r["strategy"] == name]
        summary[name] = {k: sum(r[k] for r in rows) / len(rows) for k in ("label_accuracy", "psnr", "ssim")}
    write_json("labels_effect", {"benchmark": "Inverting Gradients at batch 8 with each strategy's labels vs the true labels",
                                 "settings": vars(args) | {"victim": "ConvNet(flatten head) untrained, 32 px",
                                                           "restarts": 1}, "summary": summary, "results": results})


if __name__ == "__main__":
    main()
