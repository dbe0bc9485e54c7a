"""Issue-2 bars: iDLG label accuracy over random sigmoid LeNets (batch 1, 10 and 100 classes), DLG's
label accuracy on the same cases, and the fraction of 32x32 photographs recovered to MSE < 1e-3 by
iDLG and by DLG with 300 L-BFGS steps (the iDLG paper's comparison).

    python benchmarks/dlg_vs_idlg.py [--networks 100] [--reconstructions 10] [--steps 300]
    python benchmarks/dlg_vs_idlg.py --reconstructions 0 --dlg-label-steps 50 --out dlg_labels
        (DLG's label accuracy on every network, with a shorter L-BFGS budget per network)
"""
from __future__ import annotations

import argparse
import time

import torch

from common import lean_trainer, single_thread, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--networks", type=int, default=100, help="random LeNets per class count (label rule)")
    parser.add_argument("--reconstructions", type=int, default=10, help="cases per class count run with both attacks")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--dlg-label-steps", type=int, default=0, help="also run DLG on EVERY network for its label")
    parser.add_argument("--out", default="dlg_vs_idlg", help="name of the JSON file in benchmarks/results/")
    args = parser.parse_args()
    single_thread()

    from lightning_gi.attacks import DLG, IDLG
    from lightning_gi.labels import IDLGLabels
    from lightning_gi.observation import capture_observation
    from lightning_gi.victim import LeNet, TensorBatchVictim
    from lightning_gi.victim.data import BundledPhotographs

    photos = BundledPhotographs(image_size=args.image_size, crops_per_photo=8)
    results = {"settings": vars(args), "by_num_classes": {}}
    for num_classes in (10, 100):
        gen = torch.Generator().manual_seed(1000 + num_classes)
        rule_correct, dlg_label_correct, cases = 0, 0, []
        for k in range(args.networks):
            torch.manual_seed(k)
            model = LeNet(num_classes=num_classes, image_size=args.image_size)
            idx = int(torch.randint(len(photos), (1,), generator=gen))
            image = photos[idx][0].unsqueeze(0)
            label = torch.randint(num_classes, (1,), generator=gen)
            obs = capture_observation(model, image, label)
            rule_correct += int(IDLGLabels()(obs, model).item() == label.item())
            if args.dlg_label_steps:
                dlg = DLG(seed=k)
                lean_trainer(args.dlg_label_steps).fit(dlg, TensorBatchVictim(model, image, label))
                dlg_label_correct += int(dlg.reconstruction()["labels"].item() == label.item())
            if k < args.reconstructions:
                case = {"network_seed": k, "photo_index": idx, "label": int(label)}
                for name, cls in (("idlg", IDLG), ("dlg", DLG)):
                    attack = cls(seed=k)
                    t0 = time.perf_counter()
                    lean_trainer(args.steps).fit(attack, TensorBatchVictim(model, image, label))
                    rec = attack.reconstruction()
                    case[name] = {
                        "mse": float(((rec["images"] - image) ** 2).mean()),
                        "label_correct": bool(rec["labels"].item() == label.item()),
                        "seconds": time.perf_counter() - t0,
                    }
                cases.append(case)
                print(num_classes, k, {n: case[n] for n in ("idlg", "dlg")}, flush=True)
        summary = {"idlg_rule_label_accuracy": rule_correct / args.networks, "networks": args.networks}
        if args.dlg_label_steps:
            summary["dlg_label_accuracy_all_networks"] = dlg_label_correct / args.networks
            summary["dlg_label_steps"] = args.dlg_label_steps
        for name in ("idlg", "dlg") if cases else ():
            mses = torch.tensor([c[name]["mse"] for c in cases])
            summary[name] = {
                "label_accuracy": sum(c[name]["label_correct"] for c in cases) / len(cases),
                "fraction_mse_below_1e-3": float((mses < 1e-3).float().mean()),
                "median_mse": float(mses.median()),
                "mean_seconds": sum(c[name]["seconds"] for c in cases) / len(cases),
                "cases": len(cases),
            }
        results["by_num_classes"][str(num_classes)] = {"summary": summary, "cases": cases}
        print(num_classes, summary, flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
