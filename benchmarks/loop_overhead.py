"""Issue-2 bar: our Lightning attack's iterations/s vs a plain PyTorch loop of the same math, same run.

Cases: the sigmoid LeNet 32x32 batch 1 (iDLG math: L-BFGS lr 1, 20 inner iterations, history 100) and
ResNet-18 32x32 batch 8 (squared-L2 matching with Adam: one victim double-backward per step).
Each case alternates plain and Lightning runs (``--repeats`` times) and reports the median ratio, for
the lean Trainer (no logger/progress bar) and for the full CLI setup (TensorBoard logging every 5 steps,
image grids every 25, progress bar, periodic reconstruction saves).

Measures loop overhead (a config cannot express a plain loop next to ours), so it builds the attacks itself.

    python -m benchmarks.loop_overhead [--lenet-steps 60] [--resnet-steps 20] [--repeats 3] [--smoke]
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/loop_overhead.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch
from torch import nn

from benchmarks.common import add_common_arguments, lean_trainer, single_thread, write_result


class LoopTimer(pl.Callback):
    """Wall time from the first training batch to the last (setup and end-of-run reports excluded)."""

    def __init__(self) -> None:
        self.start = None
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds = time.perf_counter() - self.start


def plain_loop(model, image, label, steps, make_optimizer, seed):
    """The same math without Lightning: autograd.grad(create_graph) -> squared L2 -> backward(inputs=dummy)."""
    params = list(model.parameters())
    target = [g.detach() for g in torch.autograd.grad(nn.functional.cross_entropy(model(image), label), params)]
    dummy = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    opt = make_optimizer([dummy])

    def closure():
        opt.zero_grad()
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(dummy), label), params, create_graph=True)
        loss = sum(((g - t) ** 2).sum() for g, t in zip(grads, target))
        loss.backward(inputs=[dummy])
        return loss

    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(closure)
    return time.perf_counter() - t0, dummy.detach()


def lightning_run(model, image, label, steps, make_optimizer, seed, full):
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_gi.attacks import IDLG
    from lightning_gi.callbacks import ReconstructionMonitor, ReconstructionReport
    from lightning_gi.labels import SharedLabels
    from lightning_gi.victim import TensorBatchVictim

    attack = IDLG(optimizer=make_optimizer, seed=seed, label_strategy=SharedLabels())
    dm = TensorBatchVictim(model, image, label, share_labels=True)
    timer = LoopTimer()
    with tempfile.TemporaryDirectory() as tmp:
        if full:
            trainer = lean_trainer(
                steps,
                logger=TensorBoardLogger(tmp, name="bench"),
                log_every_n_steps=5,
                enable_progress_bar=True,
                callbacks=[timer, ReconstructionMonitor(every_n_steps=25), ReconstructionReport(save_every_n_steps=100)],
            )
        else:
            trainer = lean_trainer(steps, callbacks=[timer])
        trainer.fit(attack, dm)
    return timer.seconds, attack.dummy_images.detach()


def bench_case(name, model, image, label, steps, make_optimizer, repeats):
    """Plain, lean and full runs alternated ``repeats`` times; medians of it/s and of the per-repeat ratios."""
    plain, lean, full = [], [], []
    for r in range(repeats):
        t_plain, x_plain = plain_loop(model, image, label, steps, make_optimizer, seed=r)
        t_lean, x_lean = lightning_run(model, image, label, steps, make_optimizer, seed=r, full=False)
        t_full, _ = lightning_run(model, image, label, steps, make_optimizer, seed=r, full=True)
        same = torch.allclose(x_plain, x_lean, rtol=1e-4, atol=1e-5)
        plain.append(steps / t_plain)
        lean.append(steps / t_lean)
        full.append(steps / t_full)
        print(f"{name} rep {r}: plain {plain[-1]:.2f} it/s, lightning lean {lean[-1]:.2f}, full {full[-1]:.2f}; same iterate: {same}", flush=True)
    med = statistics.median
    return {
        "case": name,
        "steps": steps,
        "repeats": repeats,
        "plain_it_per_s": med(plain),
        "lightning_lean_it_per_s": med(lean),
        "lightning_full_it_per_s": med(full),
        "lean_over_plain": med(l / p for l, p in zip(lean, plain)),
        "full_over_plain": med(f / p for f, p in zip(full, plain)),
        "same_iterate_as_plain": bool(same),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lenet-steps", type=int, default=60)
    parser.add_argument("--resnet-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.lenet_steps, args.resnet_steps, args.repeats = 2, 1, 1
    single_thread()

    from lightning_gi.victim import LeNet, torchvision_classifier
    from lightning_gi.victim.data import BundledPhotographs, select_batch

    photos = BundledPhotographs(image_size=32, crops_per_photo=4)
    rows = []

    torch.manual_seed(0)
    lenet = LeNet(num_classes=10)
    image, _, _ = select_batch(photos, 1, seed=0)
    lbfgs = lambda p: torch.optim.LBFGS(p, lr=1.0, max_iter=20, history_size=100)  # noqa: E731
    rows.append(bench_case("lenet32_b1_lbfgs", lenet, image, torch.tensor([3]), args.lenet_steps, lbfgs, args.repeats))

    adam = lambda p: torch.optim.Adam(p, lr=0.1)  # noqa: E731
    rows.append(bench_case("lenet32_b1_adam", lenet, image, torch.tensor([3]), args.lenet_steps * 5, adam, args.repeats))

    torch.manual_seed(0)
    resnet = torchvision_classifier("resnet18", num_classes=photos.num_classes).eval()
    images, labels, _ = select_batch(photos, 8, seed=0, label_mode="unique")
    rows.append(bench_case("resnet18_32_b8_adam", resnet, images, labels, args.resnet_steps, adam, args.repeats))
    settings = {k: v for k, v in vars(args).items() if k != "results_dir"}
    write_result("loop_overhead", settings, rows, out=args.results_dir)
    for row in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})


if __name__ == "__main__":
    main()
