"""Vectorised vs sequential restarts: restarts per second at R = 8 (sigmoid LeNet, ConvNet width 32, ResNet-18; 32x32).

One optimisation step of R restarts (Inverting Gradients objective: cosine distance + TV, Adam, boxed) is
timed for :class:`ImagePriorAttack` with ``restart_mode="sequential"`` (restarts one after the other) and
``restart_mode="vectorised"`` (restarts as one vmapped computation). Measurements alternate between the two (ABAB...) so that load from
other processes hits both alike; the ratio is the median over rounds. The first step's per-restart distances
of both are compared (they must agree). JSON: benchmarks/results/restarts_throughput[_<device>].json.
Raw throughput of the restart loop (no recipe: a config cannot express it), so the attacks are built here.

Run: OMP_NUM_THREADS=1 python -m benchmarks.restarts_throughput [--device cuda] [--restarts 8] [--smoke]
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/restarts_throughput.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import time

import torch

from benchmarks.common import add_common_arguments, environment, single_thread, write_result


def _victim(name: str, num_classes: int = 10) -> torch.nn.Module:
    from lightning_gi.victim import LeNet
    from lightning_gi.victim.models import torchvision_classifier

    from lightning_gi.victim.models import ConvNet

    torch.manual_seed(0)
    if name == "lenet":
        return LeNet(num_classes=num_classes, image_size=32).eval()
    if name in ("convnet", "convnet64"):
        return ConvNet(num_classes=num_classes, width=64 if name == "convnet64" else 32, depth=3, image_size=32).eval()
    if name not in ("resnet18", "resnet34"):
        raise ValueError(f"unknown victim {name!r}: lenet, convnet, convnet64, resnet18 or resnet34")
    return torchvision_classifier(name, num_classes=num_classes).eval()


def _bound(mode: str, name: str, restarts: int, batch: int, device: torch.device):
    from lightning_gi.attacks import ImagePriorAttack, SignedGradient
    from lightning_gi.labels import SharedLabels
    from lightning_gi.objectives import CosineDistance
    from lightning_gi.objectives.priors import TotalVariation
    from lightning_gi.observation import capture_observation
    from lightning_gi.victim.datamodule import AttackInputs

    model = _victim(name)
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(batch) % 10
    obs = capture_observation(model, images, labels, share_labels=True)
    zeros = torch.zeros(3, 1, 1)
    inputs = AttackInputs(model, obs, (3, 32, 32), zeros, zeros + 1, 10)
    attack = ImagePriorAttack(
        label_strategy=SharedLabels(), distance=CosineDistance(), priors=[TotalVariation(weight=1e-4)],
        update_rule=SignedGradient(), boxed=True, restarts=restarts, seed=0, restart_mode=mode,
    )
    attack.bind(inputs, device=device)
    opt = torch.optim.Adam(attack._unknowns, lr=0.1)
    return attack, opt


def _step(attack, opt) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss, distances, images, _ = attack.evaluate()
    attack.update_best(distances.detach(), images.detach())
    attack.backward(loss)
    attack.on_before_optimizer_step(opt)
    opt.step()
    attack.project()
    return distances.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(attack, opt, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``steps`` steps: on a shared machine the CPU time is the steadier figure."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _step(attack, opt)
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _peak_memory(mode, name, restarts, batch, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    attack, opt = _bound(mode, name, restarts, batch, device)
    _step(attack, opt)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del attack, opt
    return peak


def bench(name: str, restarts: int, batch: int, steps: int, rounds: int, device: torch.device) -> dict:
    seq = _bound("sequential", name, restarts, batch, device)
    vec = _bound("vectorised", name, restarts, batch, device)
    if not vec[0].vectorised_restarts or seq[0].vectorised_restarts:
        raise RuntimeError("restart_mode was not honoured: the comparison would time the same loop twice")
    d_seq, d_vec = _step(*seq), _step(*vec)  # also the warm-up
    max_rel_diff = float(((d_vec - d_seq).abs() / d_seq.abs().clamp_min(1e-12)).max())
    _step(*seq), _step(*vec)
    t_seq, t_vec, c_seq, c_vec = [], [], [], []
    for r in range(rounds):
        for mode in (("seq", "vec") if r % 2 == 0 else ("vec", "seq")):  # the order alternates too
            wall, cpu = _time(*(seq if mode == "seq" else vec), steps, device)
            (t_seq if mode == "seq" else t_vec).append(wall / steps)
            (c_seq if mode == "seq" else c_vec).append(cpu / steps)
    ratios = [s / v for s, v in zip(t_seq, t_vec)]
    cpu_ratios = [s / v for s, v in zip(c_seq, c_vec)]
    out = {
        "victim": name,
        "restarts": restarts,
        "batch_size": batch,
        "steps_per_round": steps,
        "rounds": rounds,
        "sequential_s_per_step": statistics.median(t_seq),
        "vectorised_s_per_step": statistics.median(t_vec),
        "sequential_restarts_per_s": restarts / statistics.median(t_seq),
        "vectorised_restarts_per_s": restarts / statistics.median(t_vec),
        "ratio_median": statistics.median(ratios),
        "ratio_per_round": ratios,
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratio_per_round": cpu_ratios,
        "first_step_distance_max_rel_diff": max_rel_diff,
    }
    del seq, vec
    if device.type == "cuda":
        out["sequential_peak_mib"] = _peak_memory("sequential", name, restarts, batch, device)
        out["vectorised_peak_mib"] = _peak_memory("vectorised", name, restarts, batch, device)
    print(
        f"{name:9s} R={restarts} N={batch} {device.type}: sequential {out['sequential_restarts_per_s']:.2f} restarts/s, "
        f"vectorised {out['vectorised_restarts_per_s']:.2f} restarts/s, ratio {out['ratio_median']:.2f}x "
        f"(rounds {[round(r, 2) for r in ratios]}), first-step rel diff {max_rel_diff:.1e}",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lenet-steps", type=int, default=20)
    parser.add_argument("--resnet-steps", type=int, default=3)
    parser.add_argument("--victims", default="lenet,convnet,resnet18", help="comma-separated: lenet, convnet (width 32), convnet64, resnet18, resnet34")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.restarts, args.rounds, args.lenet_steps, args.resnet_steps, args.victims = 2, 1, 2, 1, "lenet"
    single_thread()
    device = torch.device(args.device)
    results = []
    for name in args.victims.split(","):
        steps = args.lenet_steps if name in ("lenet", "convnet", "convnet64") else args.resnet_steps
        if device.type == "cuda":
            steps *= 10
        results.append(bench(name, args.restarts, args.batch, steps, args.rounds, device))
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    settings = {k: v for k, v in vars(args).items() if k != "results_dir"}
    write_result("restarts_throughput", settings, results, name=f"restarts_throughput{suffix}", out=args.results_dir,
                 env=environment(str(device)))


if __name__ == "__main__":
    main()
