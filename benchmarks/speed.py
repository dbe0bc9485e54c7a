"""Issue-17 bars: our attack loop vs a plain PyTorch loop of the same math, alternating A/B in one process.

The plain loop is the floor any framework must meet: it differentiates only with respect to the dummies
(``torch.autograd.grad(objective, [dummies])``), has no Trainer, no hooks, no logging, no best-iterate
bookkeeping. Ours runs through a lean ``pl.Trainer`` (no logger, no progress bar, no guard) and is timed from
the first ``training_step`` to the last (setup and end-of-run reports excluded). Every case alternates plain
and ours ``--pairs`` times from the same initial dummies; the ratio reported is ours_it_per_s / plain_it_per_s
(higher is better, 1.0 = no framework cost) with its median, min and max over the pairs.

Cases (CPU suite, the default):
  lenet_idlg_lbfgs        sigmoid LeNet 32x32 batch 1, squared L2, L-BFGS (lr 1, 20 inner iterations)
                          (ours: steps_per_call 1, automatic optimisation, and 4)
  lenet_adam              same victim and distance, Adam lr 0.1 (ours: steps_per_call 1 and 10)
  lenet_signed_adam       same, Adam on the sign of the gradient (ours: steps_per_call 1 and 10)
  resnet18_ig_b8          Inverting Gradients on ResNet-18 32x32 batch 8: cosine + TV 1e-4, signed Adam,
                          box, MultiStepLR at 3/8, 5/8, 7/8 (eager)
  restarts_r8_lenet       R=8 restarts, IG objective on LeNet 32x32: restart_mode auto vs sequential
                          (and vectorised, for information)
  restarts_r8_resnet18_32 the same on ResNet-18 32x32 batch 1 (the bar: auto >= 1.0x sequential)
  with --compile (each variant of ours timed after 2 untimed warm-up batches, where the compile falls):
  lenet_adam_compiled     the LeNet Adam case: eager and compiled, steps_per_call 10, and compiled with 1
  resnet18_ig_b8_compiled the ResNet-18 case: eager and compiled

Time to the first step (``--suite first-step``, ``speed_first_step.json``): ``make demo`` (the iDLG LeNet config through
the CLI) against a plain script that imports torch and builds the same victim, each a fresh process, alternating.

The GPU suite (``--suite gpu``, run by benchmarks/gpu_suite.sh) times larger cases per device with peak memory
(see that script); ``--smoke`` shrinks every size so that the whole suite runs on a CPU in seconds.

Loop overhead and raw throughput against a plain loop: a config cannot express the plain loop, so the attacks
are built here. Rows of the JSON envelope: one per (case, variant of ours), with the case's plain-loop figures.

    OMP_NUM_THREADS=1 python -m benchmarks.speed [--pairs 3] [--scale 1.0] [--cases a,b] [--compile] [--out speed] [--smoke]
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/speed.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from benchmarks.common import environment, write_result


# ----------------------------------------------------------------------------------------------------- helpers
def setup_threads() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flat_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (case, variant): the case's fields, ``variant`` and the variant's figures (dotted keys)."""
    rows = []
    for r in results:
        case = {k: v for k, v in r.items() if k != "variants"}
        for variant, figures in r["variants"].items():
            rows.append({**case, "variant": variant, **figures})
    return rows


def write(name: str, settings: dict[str, Any], device: torch.device, results: list[dict[str, Any]]) -> Path:
    """The envelope: ``name`` is a file name in the results directory, or a path ending in .json."""
    directory = settings.get("results_dir")
    settings = {k: v for k, v in settings.items() if k != "results_dir"}
    as_path = name.endswith(".json")
    return write_result("speed", settings, flat_rows(results), name=None if as_path else name,
                        out=name if as_path else directory, env=environment(str(device)))


class Seconds(float):
    """Wall-clock seconds (the float value) with the process's CPU seconds over the same interval (``cpu``).

    On a machine shared with other jobs the wall time of a one-thread run includes the time it waited for a core;
    its CPU time does not, so CPU-time ratios are the steadier estimate of the framework's own cost (both are
    reported; the bars are judged on wall time)."""

    cpu: float

    def __new__(cls, wall: float, cpu: float) -> "Seconds":
        obj = super().__new__(cls, wall)
        obj.cpu = cpu
        return obj


class Clock:
    """Starts at construction; :meth:`seconds` is the wall and CPU time since then."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> Seconds:
        return Seconds(time.perf_counter() - self.wall, time.process_time() - self.cpu)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "pairs": values}


def target_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(images), labels)
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def l2_match(grads, targets):
    return sum(((g - t) ** 2).sum() for g, t in zip(grads, targets))


def cosine_match(target_sq_norm):
    def match(grads, targets):
        dot = sum((g * t).sum() for g, t in zip(grads, targets))
        norm = sum(g.pow(2).sum() for g in grads)
        return 1.0 - dot / (norm.sqrt() * target_sq_norm.sqrt())

    return match


# ----------------------------------------------------------------------------------------------------- plain loop
def plain_loop(
    model: nn.Module,
    labels: torch.Tensor,
    targets: list[torch.Tensor],
    init: torch.Tensor,
    steps: int,
    make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    match: Callable,
    prior: Optional[nn.Module] = None,
    signed: bool = False,
    box: Optional[tuple[float, float]] = None,
    milestones: Optional[list[int]] = None,
    device: torch.device = torch.device("cpu"),
) -> tuple[float, torch.Tensor]:
    """Seconds for ``steps`` optimiser steps of the same math, and the final dummies."""
    params = list(model.parameters())
    dummy = init.clone().requires_grad_(True)
    opt = make_opt([dummy])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1) if milestones else None
    lbfgs = isinstance(opt, torch.optim.LBFGS)

    def closure():
        opt.zero_grad()
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(dummy), labels), params, create_graph=True)
        obj = match(grads, targets)
        if prior is not None:
            obj = obj + prior.weight * prior(dummy)
        (g,) = torch.autograd.grad(obj, [dummy])
        dummy.grad = g.sign() if signed else g
        return obj

    sync(device)
    clock = Clock()
    for _ in range(steps):
        if lbfgs:
            opt.step(closure)
        else:
            closure()
            opt.step()
        if box is not None:
            with torch.no_grad():
                dummy.clamp_(*box)
        if sched is not None:
            sched.step()
    sync(device)
    return clock.seconds(), dummy.detach()


# ----------------------------------------------------------------------------------------------------- our loop
class LoopTimer:
    """A Lightning callback (built lazily): wall time from the first timed training batch to the last."""

    @staticmethod
    def make(device: torch.device, skip: int = 0):
        import pytorch_lightning as pl

        class _Timer(pl.Callback):
            """``skip`` first batches are warm-up (a compiled step's cold compile) and not timed; ``steps`` counts
            the optimiser steps inside the timed window (several per batch under ``steps_per_call``)."""

            def __init__(self) -> None:
                self.start: Optional[Clock] = None
                self.start_step = 0
                self.steps = 0
                self.seconds = Seconds(0.0, 0.0)
                self.skip = skip

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if self.start is None and batch_idx >= self.skip:
                    sync(device)
                    self.start = Clock()
                    self.start_step = trainer.global_step

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if self.start is not None:
                    sync(device)
                    self.seconds = self.start.seconds()
                    self.steps = trainer.global_step - self.start_step

        return _Timer()


def our_loop(attack, model, images, labels, steps: int, device: torch.device, warmup: int = 0) -> tuple[float, torch.Tensor, Any]:
    """Seconds for ``steps`` optimiser steps through a lean Trainer, and the final dummies. With ``warmup`` the
    first ``warmup`` batches (a compiled step's cold compile and any recompile) are run but not timed, and the time
    of the remaining steps is scaled to ``steps``: the run itself is unchanged, so its final dummies still compare
    with the plain loop's."""
    import pytorch_lightning as pl

    from lightning_gi.victim import TensorBatchVictim

    timer = LoopTimer.make(device, skip=warmup)
    if warmup and steps <= warmup * getattr(attack, "steps_per_call", 1):
        raise ValueError(f"{steps} steps leave nothing to time after {warmup} warm-up batches")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator=accelerator, devices=1, default_root_dir=tmp, callbacks=[timer],
        )
        trainer.fit(attack, TensorBatchVictim(model, images.cpu(), labels.cpu(), share_labels=True))
    if warmup:
        f = steps / max(1, timer.steps)
        timer.seconds = Seconds(timer.seconds * f, timer.seconds.cpu * f)
    dummies = getattr(attack, "dummy_images", None)
    if isinstance(dummies, torch.Tensor) and dummies.dim() >= 4:
        dummies = dummies.detach().reshape(-1, *dummies.shape[-3:])[: images.shape[0]]
    else:
        dummies = None
    return timer.seconds, dummies, attack


def enable_compile_cache() -> None:
    """torch.compile's on-disk caches (inductor FX graphs and AOTAutograd): a second process starts compiled
    steps from the cache instead of a cold compile (``TORCHINDUCTOR_CACHE_DIR`` chooses the directory)."""
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


# ----------------------------------------------------------------------------------------------------- cases
def lenet_victim(size: int, device: torch.device):
    from lightning_gi.victim import LeNet

    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=size).to(device).eval()
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    return model, images, torch.tensor([3], device=device)


def resnet_victim(arch: str, size: int, batch: int, device: torch.device, classes: int = 10):
    from lightning_gi.victim import torchvision_classifier

    torch.manual_seed(0)
    model = torchvision_classifier(arch, num_classes=classes).to(device).eval()
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    labels = (torch.arange(batch) % classes).to(device)
    return model, images, labels


def alternate(name: str, pairs: int, plain: Callable[[int], tuple[float, torch.Tensor]], ours: dict[str, Callable[[int], tuple[float, torch.Tensor]]],
              steps: int, bar: Optional[float | dict[str, float]] = None) -> dict[str, Any]:
    """Alternate plain and every variant of ours ``pairs`` times (the order rotating from pair to pair); ratios per
    pair. ``bar``: one bar for every
    variant, or a bar per variant name (variants not named have none)."""
    plain_t: list[float] = []
    ours_t: dict[str, list[float]] = {k: [] for k in ours}
    diffs: dict[str, float] = {}
    names = ["plain", *ours]
    for r in range(pairs):
        # the order within a pair rotates (pair r starts with the r-th run) so that no variant always runs first
        order = names[r % len(names):] + names[: r % len(names)]
        finals: dict[str, Any] = {}
        for k in order:
            if k == "plain":
                t_p, finals[k] = plain(r)
                plain_t.append(t_p)
            else:
                t_o, finals[k] = ours[k](r)
                ours_t[k].append(t_o)
        x_p = finals["plain"]
        for k in ours:
            x_o = finals[k]
            if x_o is not None and x_p is not None and x_o.shape == x_p.shape:
                diffs[k] = max(diffs.get(k, 0.0), float((x_o.float().cpu() - x_p.float().cpu()).abs().max()))
        print(f"{name} pair {r}: plain {steps / t_p:.2f} it/s; " + ", ".join(f"{k} {steps / v[-1]:.2f}" for k, v in ours_t.items())
              + " (cpu-time ratios " + ", ".join(f"{k} {getattr(t_p, 'cpu', 0) / max(getattr(v[-1], 'cpu', 0), 1e-12):.3f}" for k, v in ours_t.items()) + ")",
              flush=True)
    out: dict[str, Any] = {
        "case": name,
        "steps": steps,
        "pairs": pairs,
        "plain_ms_per_step": 1000 * statistics.median(plain_t) / steps,
        "variants": {},
    }
    cpu_plain = [getattr(t, "cpu", None) for t in plain_t]
    if None not in cpu_plain:
        out["plain_cpu_ms_per_step"] = 1000 * statistics.median(cpu_plain) / steps
    for k, ts in ours_t.items():
        ratios = [p / o for p, o in zip(plain_t, ts)]
        out["variants"][k] = {
            "ms_per_step": 1000 * statistics.median(ts) / steps,
            "ratio_vs_plain": spread(ratios),
            "max_abs_diff_final_dummies_vs_plain": diffs.get(k),
        }
        cpu_ours = [getattr(t, "cpu", None) for t in ts]
        if None not in cpu_plain and None not in cpu_ours:  # CPU-time ratio: the steadier figure on a shared machine
            out["variants"][k]["cpu_ms_per_step"] = 1000 * statistics.median(cpu_ours) / steps
            out["variants"][k]["cpu_ratio_vs_plain"] = spread([p / o for p, o in zip(cpu_plain, cpu_ours)])
        b = bar.get(k) if isinstance(bar, dict) else bar
        if b is not None:
            out["variants"][k]["bar"] = b
            out["variants"][k]["meets_bar"] = statistics.median(ratios) >= b
    return out


def cpu_suite(args: argparse.Namespace, device: torch.device, results: list) -> list[dict[str, Any]]:
    from lightning_gi.attacks import IDLG, ImagePriorAttack, InvertingGradients, SignedGradient
    from lightning_gi.attacks.image_prior import milestones_from_fractions
    from lightning_gi.labels import SharedLabels
    from lightning_gi.objectives import CosineDistance, SquaredL2Distance
    from lightning_gi.objectives.priors import TotalVariation

    scale = args.scale
    seed_init = lambda shape, r: torch.randn(shape, generator=torch.Generator().manual_seed(r))  # noqa: E731
    only = set(args.cases.split(",")) if args.cases else None

    def want(name: str) -> bool:
        return only is None or name in only

    # LeNet, iDLG L-BFGS ------------------------------------------------------------------------------------
    model, images, labels = lenet_victim(32, device)
    targets = target_gradients(model, images, labels)
    lbfgs = lambda p: torch.optim.LBFGS(p, lr=1.0, max_iter=20, history_size=100)  # noqa: E731
    adam = lambda p: torch.optim.Adam(p, lr=0.1)  # noqa: E731
    if want("lenet_idlg_lbfgs"):
        steps = max(2, int(8 * scale))
        results.append(alternate(
            "lenet_idlg_lbfgs", args.pairs,
            lambda r: plain_loop(model, labels, targets, seed_init(images.shape, r), steps, lbfgs, l2_match),
            {"ours": lambda r: our_loop(IDLG(optimizer=lbfgs, seed=r, label_strategy=SharedLabels()), model, images, labels, steps, device)[:2],
             "ours_steps_per_call_4": lambda r: our_loop(IDLG(optimizer=lbfgs, seed=r, label_strategy=SharedLabels(), steps_per_call=4),
                                                         model, images, labels, steps, device)[:2]},
            steps, bar=0.95,
        ))
    for signed in (False, True):
        name = "lenet_signed_adam" if signed else "lenet_adam"
        if not want(name):
            continue
        steps = max(20, int(200 * scale))

        def ours_fn(k: int, signed: bool = signed):
            return lambda r: our_loop(
                ImagePriorAttack(optimizer=adam, seed=r, label_strategy=SharedLabels(), distance=SquaredL2Distance(),
                                 priors=[], update_rule=SignedGradient() if signed else None, steps_per_call=k),
                model, images, labels, steps, device)[:2]

        results.append(alternate(
            name, args.pairs,
            lambda r, signed=signed: plain_loop(model, labels, targets, seed_init(images.shape, r), steps, adam, l2_match, signed=signed),
            {"ours_steps_per_call_1": ours_fn(1), "ours_steps_per_call_10": ours_fn(10)},
            steps, bar=0.9,
        ))
    if args.compile and want("lenet_adam_compiled"):
        # compiled vs eager vs plain on the LeNet Adam case; every variant of ours skips the same first 2 batches
        # (the compile; torch's on-disk cache makes it seconds after the first process)
        steps = max(40, int(200 * scale))

        def ours_c(k: int, compile: bool):
            return lambda r: our_loop(
                ImagePriorAttack(optimizer=adam, seed=r, label_strategy=SharedLabels(), distance=SquaredL2Distance(),
                                 priors=[], steps_per_call=k, compile=compile),
                model, images, labels, steps, device, warmup=2)[:2]

        results.append(alternate(
            "lenet_adam_compiled", args.pairs,
            lambda r: plain_loop(model, labels, targets, seed_init(images.shape, r), steps, adam, l2_match),
            {"ours_eager_steps_per_call_10": ours_c(10, False), "ours_compiled_steps_per_call_10": ours_c(10, True),
             "ours_compiled_steps_per_call_1": ours_c(1, True)},
            steps, bar={"ours_eager_steps_per_call_10": 0.9, "ours_compiled_steps_per_call_10": 1.3,
                        "ours_compiled_steps_per_call_1": 1.3},
        ))

    # ResNet-18 32x32 batch 8, Inverting Gradients ------------------------------------------------------------
    if want("resnet18_ig_b8"):
        steps = max(2, int(4 * scale))
        rmodel, rimages, rlabels = resnet_victim("resnet18", 32, 8, device)
        rtargets = target_gradients(rmodel, rimages, rlabels)
        tsq = sum(t.pow(2).sum() for t in rtargets)
        milestones = milestones_from_fractions([3 / 8, 5 / 8, 7 / 8], steps)
        tv = TotalVariation(weight=1e-4)
        results.append(alternate(
            "resnet18_ig_b8", args.pairs,
            lambda r: plain_loop(rmodel, rlabels, rtargets, seed_init(rimages.shape, r), steps, adam, cosine_match(tsq),
                                 prior=tv, signed=True, box=(0.0, 1.0), milestones=milestones),
            {"ours_eager": lambda r: our_loop(InvertingGradients(seed=r, label_strategy=SharedLabels(), distance=CosineDistance()),
                                              rmodel, rimages, rlabels, steps, device)[:2]},
            steps, bar=0.95,
        ))
    if args.compile and want("resnet18_ig_b8_compiled"):
        # eager and compiled, both timed after the same 2 warm-up steps (the compile falls there)
        steps = max(4, int(6 * scale))
        rmodel, rimages, rlabels = resnet_victim("resnet18", 32, 8, device)
        rtargets = target_gradients(rmodel, rimages, rlabels)
        tsq = sum(t.pow(2).sum() for t in rtargets)
        milestones = milestones_from_fractions([3 / 8, 5 / 8, 7 / 8], steps)
        tv = TotalVariation(weight=1e-4)

        def ig_c(compile: bool):
            return lambda r: our_loop(InvertingGradients(seed=r, label_strategy=SharedLabels(), distance=CosineDistance(), compile=compile),
                                      rmodel, rimages, rlabels, steps, device, warmup=2)[:2]

        results.append(alternate(
            "resnet18_ig_b8_compiled", args.pairs,
            lambda r: plain_loop(rmodel, rlabels, rtargets, seed_init(rimages.shape, r), steps, adam, cosine_match(tsq),
                                 prior=tv, signed=True, box=(0.0, 1.0), milestones=milestones),
            {"ours_eager": ig_c(False), "ours_compiled": ig_c(True)},
            steps, bar={"ours_eager": 0.95, "ours_compiled": 1.3},
        ))

    # R = 8 restarts on CPU: auto vs sequential (and vectorised) -------------------------------------------
    if want("restarts_r8_lenet"):
        results.append(restarts_case(model, images, labels, 8, max(3, int(10 * scale)), args.pairs, device))
    if want("restarts_r8_resnet18_32"):  # the bar's case: ResNet-18 32 px, batch 1, R = 8
        rmodel, rimages, rlabels = resnet_victim("resnet18", 32, 1, device)
        results.append(restarts_case(rmodel, rimages, rlabels, 8, max(2, int(4 * scale)), args.pairs, device,
                                     name="restarts_r8_resnet18_32"))
    return results


def restarts_case(model, images, labels, restarts: int, steps: int, pairs: int, device: torch.device, name: str = "restarts_r8_lenet") -> dict[str, Any]:
    """Seconds per step for restart_mode auto / sequential / vectorised, alternating; ratios vs sequential."""
    from lightning_gi.attacks import InvertingGradients
    from lightning_gi.labels import SharedLabels

    times: dict[str, list[float]] = {"sequential": [], "auto": [], "vectorised": []}
    chosen = None
    modes = list(times)
    for r in range(pairs):
        for mode in modes[r % 3:] + modes[: r % 3]:  # the order rotates from pair to pair
            attack = InvertingGradients(seed=r, label_strategy=SharedLabels(), restarts=restarts, restart_mode=mode)
            # the first batch (allocator warm-up after another mode's run) is run but not timed
            t, _, attack = our_loop(attack, model, images, labels, steps, device, warmup=1 if steps > 2 else 0)
            times[mode].append(t)
            if mode == "auto":
                chosen = "vectorised" if attack.vectorised_restarts else "sequential"
        print(f"{name} pair {r}: " + ", ".join(f"{m} {1000 * v[-1] / steps:.1f} ms/step" for m, v in times.items()), flush=True)
    out = {"case": name, "restarts": restarts, "steps": steps, "pairs": pairs, "device": str(device), "auto_chose": chosen, "variants": {}}
    for mode, ts in times.items():
        out["variants"][mode] = {
            "ms_per_step": 1000 * statistics.median(ts) / steps,
            "ratio_vs_sequential": spread([s / t for s, t in zip(times["sequential"], ts)]),
            "cpu_ratio_vs_sequential": spread([s.cpu / t.cpu for s, t in zip(times["sequential"], ts)]),
        }
    auto = out["variants"]["auto"]
    auto["bar"] = 1.0
    auto["meets_bar"] = auto["ratio_vs_sequential"]["median"] >= 1.0
    return out



# ----------------------------------------------------------------------------------------------------- GPU suite
def peak_memory(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measured(device: torch.device, fn: Callable[[int], tuple[float, Any]]) -> Callable[[int], tuple[float, Any]]:
    """Wrap a run so that its peak device memory (MiB, CUDA only) is recorded in ``fn.peaks``."""
    peaks: list[Optional[float]] = []

    def run(r: int):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        out = fn(r)
        peaks.append(peak_memory(device))
        return out[0], out[1]

    run.peaks = peaks  # type: ignore[attr-defined]
    return run


def with_peaks(result: dict[str, Any], plain, ours: dict[str, Any]) -> dict[str, Any]:
    result["plain_peak_mib"] = max(plain.peaks) if plain.peaks and plain.peaks[0] is not None else None
    for k, fn in ours.items():
        result["variants"][k]["peak_mib"] = max(fn.peaks) if fn.peaks and fn.peaks[0] is not None else None
    return result


def gpu_suite(args: argparse.Namespace, device: torch.device, results: list) -> list[dict[str, Any]]:
    """ms/iteration and peak memory of the big cases, each against a plain loop in the same run (see
    benchmarks/gpu_suite.sh). ``--smoke``: tiny sizes, one pair, no compile (a CPU runs it in seconds)."""
    from lightning_gi.attacks import InvertingGradients, StepwiseInversion
    from lightning_gi.attacks.image_prior import milestones_from_fractions
    from lightning_gi.labels import SharedLabels
    from lightning_gi.objectives import CosineDistance
    from lightning_gi.objectives.priors import TotalVariation

    smoke = args.smoke
    size = 32 if smoke else 224
    pairs = 1 if smoke else args.pairs
    steps = 2 if smoke else max(2, int(10 * args.scale))
    compile_too = (not smoke) and args.compile
    only = set(args.cases.split(",")) if args.cases else None
    seed_init = lambda shape, r: torch.randn(shape, generator=torch.Generator().manual_seed(r)).to(device)  # noqa: E731
    adam = lambda p: torch.optim.Adam(p, lr=0.1)  # noqa: E731
    tv = TotalVariation(weight=1e-4)

    def ig_case(name: str, arch: str, batch: int, attack_cls, extra_plain: str = "", with_compile: bool = False,
                n_pairs: Optional[int] = None) -> None:
        if only is not None and name not in only:
            return
        model, images, labels = resnet_victim(arch, size, batch, device)
        targets = target_gradients(model, images, labels)
        tsq = sum(t.pow(2).sum() for t in targets)
        milestones = milestones_from_fractions([3 / 8, 5 / 8, 7 / 8], steps)
        plain = measured(device, lambda r: plain_loop(model, labels, targets, seed_init(images.shape, r), steps, adam, cosine_match(tsq),
                                                      prior=tv, signed=True, box=(0.0, 1.0), milestones=milestones, device=device))
        warm = 2 if compile_too and with_compile else 0  # eager and compiled timed after the same 2 warm-up steps
        ours = {"ours_eager": measured(device, lambda r: our_loop(attack_cls(seed=r, compile=False), model, images, labels, steps, device, warmup=warm)[:2])}
        if warm:  # the cold compile, then any recompile, fall in the warm-up
            ours["ours_compiled"] = measured(device, lambda r: our_loop(attack_cls(seed=r, compile=True), model, images, labels, steps, device, warmup=warm)[:2])
        res = with_peaks(alternate(name, n_pairs or pairs, plain, ours, steps), plain, ours)
        res.update({"arch": arch, "image_size": size, "batch": batch, "device": str(device)})
        if extra_plain:
            res["plain_math"] = extra_plain
        results.append(res)

    ig = lambda seed, compile: InvertingGradients(seed=seed, label_strategy=SharedLabels(), distance=CosineDistance(), compile=compile)  # noqa: E731
    if only is None or "sync_free_step" in only:
        results.append(sync_case(device, 32 if smoke else 64, 4 if smoke else 12))
    ig_case(f"ig_resnet18_{size}_b1", "resnet18", 1, ig)
    ig_case(f"ig_resnet18_{size}_b8", "resnet18", 2 if smoke else 8, ig)
    def sw(seed: int, compile: bool):
        attack = StepwiseInversion(seed=seed, label_strategy=SharedLabels())
        attack.compile = compile  # the core's option (StepwiseInversion does not expose it as an argument)
        return attack

    ig_case(f"stepwise_resnet34_{size}_b8", "resnet34", 2 if smoke else 8, sw,
            extra_plain="Inverting Gradients math (cosine + TV, signed Adam, box): the stepwise recipe's own schedules "
                        "are not in the plain loop, so this ratio is indicative only")

    # restarts: vectorised vs sequential, R = 8
    name = f"restarts_r8_resnet18_{size}"
    if only is None or name in only:
        model, images, labels = resnet_victim("resnet18", size, 1, device)
        results.append(restarts_case(model, images, labels, 2 if smoke else 8, steps, pairs, device, name=name))

    # GIAS latent search through a StyleGAN2 generator (random weights)
    for res_px in ((32,) if smoke else (256, 512)):
        name = f"gias_stylegan2_{res_px}"
        if only is not None and name not in only:
            continue
        results.append(gias_case(name, res_px, steps, pairs, device, smoke))
    # eager vs compiled last (each compiled attack pays a compile; a time limit then only cuts this case)
    if compile_too:
        ig_case(f"ig_resnet18_{size}_b8_compiled", "resnet18", 8, ig, with_compile=True, n_pairs=min(2, pairs))
    return results


def sync_case(device: torch.device, size: int, steps: int) -> dict[str, Any]:
    """Host syncs inside the step on the device: Inverting Gradients (signed Adam, box, MultiStepLR, 2 restarts) on
    ResNet-18 batch 2 with the CLI's DivergenceGuard (``check_mode="auto"``: deferred on CUDA), run with
    ``torch.cuda.set_sync_debug_mode("warn")`` from each batch's start to its end (every callback's per-batch hook
    included); batch 0 (warm-up) is not counted. The bar: 0 synchronising CUDA calls per step."""
    import warnings

    import pytorch_lightning as pl

    from lightning_gi.attacks import InvertingGradients
    from lightning_gi.callbacks import DivergenceGuard
    from lightning_gi.labels import SharedLabels
    from lightning_gi.objectives import CosineDistance
    from lightning_gi.victim import TensorBatchVictim

    class _SyncCounter(pl.Callback):
        def __init__(self) -> None:
            self.per_step: list[int] = []
            self.messages: set[str] = set()
            self._catcher: Any = None
            self._caught: list[Any] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 1 and device.type == "cuda":
                self._catcher = warnings.catch_warnings(record=True)
                self._caught = self._catcher.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # runs after the guard's
            if self._catcher is not None:
                torch.cuda.set_sync_debug_mode(0)
                self._catcher.__exit__(None, None, None)
                syncs = [w for w in self._caught if "synchroniz" in str(w.message)]
                self.per_step.append(len(syncs))
                self.messages.update(f"{w.filename}:{w.lineno}" for w in syncs)
                self._catcher = None
            elif batch_idx >= 1:
                self.per_step.append(0)  # no CUDA: nothing can synchronise

    model, images, labels = resnet_victim("resnet18", size, 2, device)
    attack = InvertingGradients(seed=0, label_strategy=SharedLabels(), distance=CosineDistance(), restarts=2)
    counter = _SyncCounter()
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator=accelerator, devices=1, default_root_dir=tmp,
                             callbacks=[DivergenceGuard(), counter])
        trainer.fit(attack, TensorBatchVictim(model, images.cpu(), labels.cpu(), share_labels=True))
    total = sum(counter.per_step)
    print(f"sync_free_step: {total} synchronising CUDA calls in {len(counter.per_step)} counted steps "
          f"({sorted(counter.messages)[:5]})", flush=True)
    return {"case": "sync_free_step", "device": str(device), "image_size": size, "steps_counted": len(counter.per_step),
            "variants": {"ours": {"syncs_per_step_max": max(counter.per_step, default=0), "syncs_total": total,
                                  "sync_sites": sorted(counter.messages)[:20], "bar": 0, "meets_bar": total == 0}}}


def gias_case(name: str, res_px: int, steps: int, pairs: int, device: torch.device, smoke: bool) -> dict[str, Any]:
    """Ours: GIAS latent phase (z space, cosine, Adam 3e-2) with a random-weight StyleGAN2; plain: the same
    chain written directly (z -> G -> [0,1] image -> victim gradient -> cosine -> Adam on z)."""
    from lightning_gi.attacks import GIAS
    from lightning_gi.generators import create_generator
    from lightning_gi.labels import SharedLabels

    torch.manual_seed(0)
    kw = dict(img_resolution=res_px)
    if smoke:
        kw.update(z_dim=32, w_dim=32, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=512, channel_max=32, num_fp16_res=0, conv_clamp=None))
    gen = create_generator("stylegan2", **kw).to(device).eval()
    model, images, labels = resnet_victim("resnet18", res_px, 1, device)
    targets = target_gradients(model, images, labels)
    tsq = sum(t.pow(2).sum() for t in targets)
    params = list(model.parameters())
    z_dim = gen.z_dim

    def plain(r: int):
        z = torch.randn(1, z_dim, generator=torch.Generator().manual_seed(r)).to(device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=3e-2)
        match = cosine_match(tsq)
        sync(device)
        clock = Clock()
        for _ in range(steps):
            x = (gen(z, None, noise_mode="const") + 1) / 2
            grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), labels), params, create_graph=True)
            (g,) = torch.autograd.grad(match(grads, targets), [z])
            z.grad = g
            opt.step()
        sync(device)
        return clock.seconds(), None

    def ours(r: int):
        attack = GIAS(generator=gen, pretrained=False, latent_steps=steps, param_steps=0, milestone_fractions=None,
                      label_strategy=SharedLabels(), seed=r)
        return our_loop(attack, model, images, labels, steps, device)[:2]

    p, o = measured(device, plain), {"ours": measured(device, ours)}
    res = with_peaks(alternate(name, pairs, p, o, steps), p, o)
    res.update({"generator": "stylegan2 (random weights)", "resolution": res_px, "device": str(device),
                "plain_math": "z -> G -> (x+1)/2 -> victim gradient -> cosine -> Adam(3e-2) on z (GIAS latent phase)"})
    return res


# ----------------------------------------------------------------------------------------------------- time to first step
_PLAIN_FIRST_STEP = """
import os, time
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
body = nn.Sequential(nn.Conv2d(3, 12, 5, 2, 2), nn.Sigmoid(), nn.Conv2d(12, 12, 5, 2, 2), nn.Sigmoid(),
                     nn.Conv2d(12, 12, 5, 1, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(768, 10))
for p in body.parameters():
    nn.init.uniform_(p, -0.5, 0.5)
from sklearn.datasets import load_sample_image
import skimage.data
photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
photos += [getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")]
photos.append(skimage.data.stereo_motorcycle()[0])
photos += [getattr(skimage.data, n)() for n in ("camera", "coins", "page", "text", "clock")]
x = torch.from_numpy(np.ascontiguousarray(photos[0][:, :, :3].transpose(2, 0, 1))).float()[None] / 255
s = min(x.shape[-2:])
x = F.interpolate(x[..., :s, :s], size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
y = torch.tensor([0])
params = list(body.parameters())
target = [g.detach() for g in torch.autograd.grad(F.cross_entropy(body(x), y), params)]
dummy = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
opt = torch.optim.LBFGS([dummy], lr=1.0, max_iter=20, history_size=100)
print(f"FIRST_STEP {time.time() - float(os.environ['BENCH_T0']):.3f}", flush=True)
"""

_FIRST_STEP_CALLBACK = """
import os, time
import pytorch_lightning as pl


class FirstStep(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            print(f"FIRST_STEP {time.time() - float(os.environ['BENCH_T0']):.3f}", flush=True)
            os._exit(0)
"""


def first_step_seconds(command: list[str], env: dict[str, str]) -> float:
    """Seconds from just before the process starts to its ``FIRST_STEP`` line (the process stops there)."""
    import subprocess

    env = dict(env, BENCH_T0=repr(time.time()))
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    for line in out.stdout.splitlines():
        if line.startswith("FIRST_STEP "):
            return float(line.split()[1])
    raise RuntimeError(f"no FIRST_STEP line from {command[:3]}...: {out.stderr[-2000:]}")


def first_step_suite(args: argparse.Namespace, device: torch.device, results: list) -> list[dict[str, Any]]:
    """Time to the first training_step of `make demo` (configs/idlg_lenet.yaml through the CLI, its logger and
    callbacks) against a plain script that imports torch and builds the same victim (the sigmoid LeNet, the bundled
    photographs decoded as the dataset does, the batch's gradient, the L-BFGS optimiser). Alternating pairs, the
    order rotating; ratio = ours / plain seconds (lower is better, bar 1.5)."""
    import sys

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "plain_first_step.py").write_text(_PLAIN_FIRST_STEP)
        Path(tmp, "first_step_callback.py").write_text(_FIRST_STEP_CALLBACK)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([tmp, str(root)]))
        plain_cmd = [sys.executable, str(Path(tmp, "plain_first_step.py"))]
        ours_cmd = [sys.executable, "-m", "lightning_gi.cli", "fit", "--config", str(root / "configs" / "idlg_lenet.yaml"),
                    '--trainer.callbacks+={"class_path": "first_step_callback.FirstStep"}',
                    f"--trainer.logger.init_args.save_dir={tmp}/runs", f"--trainer.default_root_dir={tmp}/runs"]
        times: dict[str, list[float]] = {"plain": [], "ours": []}
        for r in range(args.pairs):
            for k in (("plain", "ours") if r % 2 == 0 else ("ours", "plain")):
                times[k].append(first_step_seconds(plain_cmd if k == "plain" else ours_cmd, env))
            print(f"first step pair {r}: plain {times['plain'][-1]:.2f} s, make demo {times['ours'][-1]:.2f} s", flush=True)
    ratios = [o / p for o, p in zip(times["ours"], times["plain"])]
    results.append({
        "case": "first_step_make_demo", "pairs": args.pairs, "plain_seconds": statistics.median(times["plain"]),
        "plain_seconds_pairs": times["plain"],
        "variants": {"ours": {"seconds": statistics.median(times["ours"]), "seconds_pairs": times["ours"],
                              "ratio_vs_plain": spread(ratios), "bar": 1.5, "meets_bar": statistics.median(ratios) <= 1.5}},
    })
    return results


# ----------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu", "first-step"], default="cpu",
                        help="cpu: the loop bars; gpu: benchmarks/gpu_suite.sh; first-step: time to the first step of make demo")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the step counts")
    parser.add_argument("--cases", default="", help="comma-separated subset of case names")
    parser.add_argument("--device", default=None, help="gpu suite: cuda (default when available) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one pair: seconds on a CPU (both suites)")
    parser.add_argument("--compile", action="store_true",
                        help="add the compiled variants (cpu: cases lenet_adam_compiled, resnet18_ig_b8_compiled; gpu: the last "
                             "case); the cold compile takes minutes on a CPU, torch's on-disk cache makes later runs start in seconds")
    parser.add_argument("--out", default=None, help="<results dir>/<out>.json, or a path ending in .json (default speed / speed_gpu / speed_smoke)")
    parser.add_argument("--results-dir", default=None, help="directory of the JSON result (default $LIGHTNING_GI_BENCH_RESULTS or benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.smoke and args.suite == "cpu":
        args.pairs, args.scale = 1, 0.05
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    setup_threads()
    if args.compile:
        enable_compile_cache()
    if args.suite == "cpu":
        device, name, suite = torch.device("cpu"), args.out or "speed", cpu_suite
    elif args.suite == "first-step":
        device, name, suite = torch.device("cpu"), args.out or "speed_first_step", first_step_suite
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        name, suite = args.out or ("speed_smoke" if args.smoke else "speed_gpu"), gpu_suite
    results = suite(args, device, _Written(lambda rows: write(name, vars(args), device, rows)))
    write(name, vars(args), device, results)


class _Written(list):
    """A result list that rewrites the JSON after every case (a suite stopped by its time limit keeps its rows)."""

    def __init__(self, flush: Callable[[list], Any]) -> None:
        super().__init__()
        self._flush = flush

    def append(self, row: Any) -> None:
        super().append(row)
        self._flush(list(self))


if __name__ == "__main__":
    main()
