"""Effect of the label strategy on the images: Inverting Gradients at batch 8 with duplicated labels.

Runs the shipped recipe ``configs/inverting_gradients_demo.yaml`` (the untrained ConvNet with a flattened head,
32x32 private bundled photographs) through ``lightning_gi.cli.run`` with overrides: a batch of 8 images of 3
classes (``label_mode: repeated``), 1 restart, ``--steps`` steps, and only the label strategy changing between
runs: each strategy's recovered labels vs the true labels (``SharedLabels``, the client sending its labels).
Same observation, same initial dummies, same budget per seed. PSNR after the Hungarian matching of the
run's report (``metrics.json``).

    python -m benchmarks.labels_effect [--seeds 10] [--steps 300] [--smoke]
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/labels_effect.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import tempfile
from typing import Any, Optional

from benchmarks.common import add_common_arguments, config_path, run_config, single_thread, write_result

CONFIG = "inverting_gradients_demo.yaml"
MEAN = "[0.4914,0.4822,0.4465]"
STD = "[0.2470,0.2435,0.2616]"
# strategy name -> overrides of the recipe
STRATEGIES: dict[str, list[str]] = {
    "true (shared)": ["--model.init_args.label_strategy=lightning_gi.labels.SharedLabels", "--data.init_args.share_labels=true"],
    "auto": ["--model.init_args.label_strategy=lightning_gi.labels.AutoLabels",
             "--model.init_args.label_strategy.init_args.image_size=32",
             f"--model.init_args.label_strategy.init_args.mean={MEAN}",
             f"--model.init_args.label_strategy.init_args.std={STD}"],
    "idlg": ["--model.init_args.label_strategy=lightning_gi.labels.IDLGLabels"],
    "llg": ["--model.init_args.label_strategy=lightning_gi.labels.LLG"],
    "ilrg": ["--model.init_args.label_strategy=lightning_gi.labels.ILRG"],
    "bias_counts": ["--model.init_args.label_strategy=lightning_gi.labels.BiasCounts"],
    "bias-corrected": ["--model.init_args.label_strategy=lightning_gi.labels.BiasCorrectedLabels"],
    "wainakh": ["--model.init_args.label_strategy=lightning_gi.labels.WainakhLabels",
                "--model.init_args.label_strategy.init_args.input_shape=[3,32,32]"],
    "yin": ["--model.init_args.label_strategy=lightning_gi.labels.YinLabels"],
    "evolutionary": ["--model.init_args.label_strategy=lightning_gi.labels.EvolutionaryLabelCounts",
                     "--model.init_args.label_strategy.init_args.image_size=32",
                     f"--model.init_args.label_strategy.init_args.mean={MEAN}",
                     f"--model.init_args.label_strategy.init_args.std={STD}"],
}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--distinct", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.batch, args.distinct, args.strategies = 1, 2, 2, 1, ["true (shared)", "idlg"]
    single_thread()

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for seed in range(args.seeds):
            for name in args.strategies:
                overrides = [
                    f"--trainer.max_steps={args.steps}", "--trainer.logger=false",
                    "--model.init_args.restarts=1", f"--model.init_args.seed={seed}",
                    f"--data.init_args.source.init_args.batch_size={args.batch}", "--data.init_args.source.init_args.label_mode=repeated",
                    f"--data.init_args.source.init_args.num_distinct={args.distinct}", f"--data.init_args.source.init_args.batch_seed={seed}",
                    f"--data.init_args.model_seed={seed}", *STRATEGIES[name],
                ]
                m = run_config(config_path(CONFIG), overrides, f"{work}/{seed}_{len(rows)}")
                row = {"kind": "run", "seed": seed, "strategy": name, "true_labels": sorted(m["true_labels"]),
                       "recovered_labels": sorted(m["recovered_labels"]), "label_accuracy": m["label_accuracy"],
                       "psnr": m["psnr"], "ssim": m["ssim"], "seconds": m["seconds"]}
                print(f"seed {seed} {name:14s} labels {row['label_accuracy']:.2f} PSNR {m['psnr']:.2f} SSIM {m['ssim']:.3f}", flush=True)
                rows.append(row)
    for name in args.strategies:
        runs = [r for r in rows if r["kind"] == "run" and r["strategy"] == name]
        rows.append({"kind": "mean", "strategy": name, "runs": len(runs),
                     **{k: sum(r[k] for r in runs) / len(runs) for k in ("label_accuracy", "psnr", "ssim")}})
    settings = {k: v for k, v in vars(args).items() if k != "results_dir"}
    settings.update({"recipe": f"configs/{CONFIG}", "restarts": 1,
                     "victim": "ConvNet(flatten head) untrained, 32 px (the recipe's victim)"})
    write_result("labels_effect", settings, rows, out=args.results_dir)


if __name__ == "__main__":
    main()
