"""Choosing a label strategy by rehearsal on labelled public images (docs/labels.md, "Rehearsal").

No count rule is best on every victim: iLRG is exact while the victim is untrained, the calibrated system
(:class:`~lightning_gi.labels.CalibratedCounts`) wins once it has learned its classes, and LLG-style rules win at
small batches of a confident victim (``benchmarks/results/labels.json``). Which one holds depends on the victim,
the batch size and the number of classes in the batch, all of which the attacker knows or reads off the update.
An attacker with labelled public images can therefore MEASURE which rule recovers counts best on this victim:
build batches with the class counts a first estimate reads off the update, from public images, compute their
gradients on the victim as the client would (one FedSGD step, mean cross-entropy), run every candidate and score
it against the known labels. No ground truth of the attacked batch is involved.

Only the last linear layer's gradient is computed (every count rule reads only that layer), so a rehearsal
costs one forward pass of the victim per rehearsal batch plus a backward pass through its head.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..client import cross_entropy, forward_keeping_buffers
from ..observation import GradientObservation, ObservationError
from .base import LabelStrategy, last_linear
from .counting import counts_to_label_vector, round_counts

__all__ = ["average_counts", "head_gradient_observation", "draw_rehearsal_batch", "labels_off", "rehearse"]


def head_gradient_observation(model: nn.Module, images: Tensor, labels: Tensor) -> GradientObservation:
    """A FedSGD observation (mean cross-entropy) whose only non-zero gradients are the last linear layer's.

    The other parameters get zero-stride zero tensors (no memory); label strategies read only the head. The
    victim's buffers (BatchNorm running statistics in training mode) are left untouched.
    """
    head = last_linear(model)
    wanted = [head.weight] + ([head.bias] if head.bias is not None else [])
    device = head.weight.device
    logits = forward_keeping_buffers(model, images.to(device))
    grads = torch.autograd.grad(cross_entropy(logits, labels.to(device)), wanted)
    by_param = {id(p): g.detach() for p, g in zip(wanted, grads)}
    zero = torch.zeros((), dtype=head.weight.dtype, device=device)
    gradients = [by_param.get(id(p), zero.expand(p.shape)) for p in model.parameters()]
    return GradientObservation(gradients=gradients, batch_size=int(images.shape[0]),
                               param_names=[n for n, _ in model.named_parameters()])


def draw_rehearsal_batch(labels: Tensor, counts: Mapping[int, int], generator: torch.Generator,
                         max_fraction: float = 0.25) -> Tensor:
    """Indices into ``labels`` for one rehearsal batch with ``counts[c]`` images of class ``c``; a class without
    images in ``labels`` is replaced by a random class that has some. Each class's batch images come from at most
    ``max_fraction`` of its images (at least one), repeated when the count is larger, so that the other images
    (three quarters or more) remain for strategies that learn from public images (CalibratedCounts)."""
    available = labels.unique().tolist()
    if not available:
        raise ValueError("rehearsal needs at least one public image")
    wanted = {int(c): int(n) for c, n in counts.items() if int(n) > 0}
    spare = [c for c in available if c not in wanted]
    plan: dict[int, int] = {}
    for c, n in wanted.items():
        if c not in available:
            if spare:
                c = spare.pop(int(torch.randint(len(spare), (1,), generator=generator)))
            else:
                c = available[int(torch.randint(len(available), (1,), generator=generator))]
        plan[c] = plan.get(c, 0) + n
    picks = []
    for c, n in plan.items():
        idx = torch.nonzero(labels == c).flatten()
        distinct = idx[torch.randperm(idx.numel(), generator=generator)[: max(1, min(n, int(max_fraction * idx.numel())))]]
        extra = distinct[torch.randint(distinct.numel(), (n - distinct.numel(),), generator=generator)]
        picks.append(torch.cat([distinct, extra]))
    return torch.cat(picks)


def labels_off(recovered: Tensor, truth: Tensor, num_classes: int) -> float:
    """Labels to change to turn one multiset into the other: half the L1 distance of the count vectors."""
    a = np.bincount(recovered.long().cpu().numpy(), minlength=num_classes)
    b = np.bincount(truth.long().cpu().numpy(), minlength=num_classes)
    size = max(a.size, b.size)
    return float(np.abs(np.pad(a, (0, size - a.size)) - np.pad(b, (0, size - b.size))).sum() / 2)


def average_counts(recovered: Sequence[Tensor], num_classes: int) -> Tensor:
    """Labels whose counts are the mean of the count vectors of ``recovered`` (label vectors of one batch),
    rounded to integers with the batch size kept (:func:`~lightning_gi.labels.counting.round_counts`)."""
    n = int(recovered[0].numel())
    mean = np.mean([np.bincount(r.long().cpu().numpy(), minlength=num_classes)[:num_classes] for r in recovered], axis=0)
    return counts_to_label_vector(round_counts(mean, n))


def rehearse(
    candidates: Callable[[Tensor], Mapping[str, LabelStrategy]],
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    counts: Mapping[int, int],
    trials: int,
    seed: int = 0,
    blends: Mapping[str, Sequence[str]] = {},
) -> dict[str, Optional[float]]:
    """Mean labels off of each candidate over ``trials`` rehearsal batches with the class counts ``counts``
    (None: the candidate failed on this victim). Each trial draws a batch (:func:`draw_rehearsal_batch`) and
    scores ``candidates(measure)``: strategies that may learn only from the public images NOT in the batch
    (``measure``: bool [M]). ``blends`` (name -> candidate names) are scored too: the average of those candidates'
    counts (:func:`average_counts`). ``images`` are victim inputs (already normalised), ``labels`` their classes."""
    num_classes = int(last_linear(model).out_features)
    gen = torch.Generator().manual_seed(int(seed))
    scores: dict[str, list[float]] = {}
    failed: set[str] = set()
    for _ in range(int(trials)):
        pick = draw_rehearsal_batch(labels, counts, gen)
        measure = torch.ones(labels.shape[0], dtype=torch.bool)
        measure[pick] = False
        observation = head_gradient_observation(model, images[pick], labels[pick])
        recovered: dict[str, Tensor] = {}
        for name, strategy in candidates(measure).items():
            scores.setdefault(name, [])
            if name in failed:
                continue
            try:
                recovered[name] = strategy(observation, model)
            except (ObservationError, ValueError, RuntimeError):
                failed.add(name)
                continue
            scores[name].append(labels_off(recovered[name], labels[pick], num_classes))
        for name, parts in blends.items():
            scores.setdefault(name, [])
            if all(p in recovered for p in parts):
                blended = average_counts([recovered[p] for p in parts], num_classes)
                scores[name].append(labels_off(blended, labels[pick], num_classes))
            else:
                failed.add(name)
    return {name: (None if name in failed or not s else float(np.mean(s))) for name, s in scores.items()}
