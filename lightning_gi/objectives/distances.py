"""Gradient distances over aligned lists of tensors (dummy gradient vs observed gradient).

Every distance takes optional per-tensor ``weights`` (a weight of 0 removes a tensor) and per-element
``masks`` (a mask entry of 0 removes an element); schedules and gradient dropout are expressed through
these, never as special cases inside a distance.

Conventions shared by all distances
-----------------------------------
* ``dummy`` and ``target`` are aligned sequences of tensors (same length, same shapes, position ``i``
  of both lists is the gradient of the same parameter).  ``dummy`` usually carries a graph built with
  ``autograd.grad(..., create_graph=True)``; every distance here is built from differentiable torch
  operations only (sort and boolean selection included) so that it can be backpropagated to the
  dummy images, and twice-differentiable where the underlying formula is.
* ``weights``: ``None`` (all ones) or one non-negative number (or scalar tensor) per tensor.  A weight
  of exactly 0 removes the tensor entirely: it is skipped, so it contributes neither to a sum nor to
  the norms of a cosine, and non-finite entries in it cannot leak into the result.  A negative
  weight raises ``ValueError``.  (A scalar *tensor* weight that lives on an accelerator is used as
  a multiplier without being inspected, to avoid a device synchronisation per step, and so is any tensor
  weight inside ``torch.compile``; a zero there still removes the tensor's contribution arithmetically.)
* ``masks``: ``None`` or one entry per tensor, each ``None`` (keep everything) or a 0/1 tensor (float
  or bool) of that tensor's shape.  The same mask is applied to both gradients, in every term of the
  distance (for cosine: in the dot product and in both norms).  Kept entries are not rescaled.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

Weights = Optional[Sequence[float | Tensor]]
Masks = Optional[Sequence[Optional[Tensor]]]

__all__ = [
    "squared_l2",
    "cosine_distance",
    "per_layer_cosine_distance",
    "wasserstein",
    "wasserstein_l2",
    "topk_magnitude_masks",
    "topk_cosine_distance",
    "GradientDistance",
    "SquaredL2Distance",
    "CosineDistance",
    "WassersteinDistance",
    "TopKCosineDistance",
    "prepare_distance",
]


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _check_aligned(dummy: Sequence[Tensor], target: Sequence[Tensor], weights: Weights, masks: Masks) -> None:
    if len(dummy) != len(target):
        raise ValueError(f"gradient lists differ in length: {len(dummy)} vs {len(target)}")
    if len(target) == 0:
        raise ValueError("gradient lists are empty")
    if weights is not None and len(weights) != len(target):
        raise ValueError(f"{len(weights)} weights for {len(target)} gradient tensors")
    if masks is not None and len(masks) != len(target):
        raise ValueError(f"{len(masks)} masks for {len(target)} gradient tensors")


def _accumulator(dummy: Sequence[Tensor]) -> Tensor:
    """A scalar zero in a dtype wide enough to accumulate the terms (at least float32)."""
    first = dummy[0]
    dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
    dtype = torch.promote_types(dtype, torch.float32)
    return torch.zeros((), dtype=dtype, device=first.device)


def _resolve_weight(w: float | Tensor, index: int) -> Optional[float | Tensor]:
    """Validate one per-tensor weight; return ``None`` when it removes the tensor."""
    if isinstance(w, Tensor):
        if w.numel() != 1:
            raise ValueError(f"weight {index} must be a scalar, got shape {tuple(w.shape)}")
        if w.device.type != "cpu" or torch.compiler.is_compiling():
            return w  # not inspected (no sync, no graph break); a zero still zeroes the contribution
        value = float(w.detach())
    else:
        value = float(w)
    if math.isnan(value) or value < 0:
        raise ValueError(f"weight {index} must be non-negative, got {value}")
    if value == 0.0:
        return None
    return w


def _resolve_mask(mask: Optional[Tensor], ref: Tensor, index: int) -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.shape != ref.shape:
        raise ValueError(f"mask {index} has shape {tuple(mask.shape)}, gradient has {tuple(ref.shape)}")
    return mask


def _terms(
    dummy: Sequence[Tensor], target: Sequence[Tensor], weights: Weights, masks: Masks
) -> Iterator[Tuple[int, Tensor, Tensor, float | Tensor, Optional[Tensor]]]:
    """Yield ``(index, dummy_i, target_i, weight_i, mask_i)`` for every tensor that is not removed."""
    _check_aligned(dummy, target, weights, masks)
    for i, (a, b) in enumerate(zip(dummy, target)):
        if a.shape != b.shape:
            raise ValueError(f"gradient {i}: dummy shape {tuple(a.shape)} != target shape {tuple(b.shape)}")
        w = 1.0 if weights is None else _resolve_weight(weights[i], i)
        if w is None:
            continue
        m = None if masks is None else _resolve_mask(masks[i], a, i)
        yield i, a, b, w, m


def _apply_mask(x: Tensor, m: Optional[Tensor]) -> Tensor:
    if m is None:
        return x
    return x * m.to(dtype=x.dtype)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with value 0 and gradient 0 at 0 (no inf * 0 = nan in backward or double backward)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------------
# squared L2 (DLG)
# ----------------------------------------------------------------------------------------------------
def squared_l2(dummy: Sequence[Tensor], target: Sequence[Tensor], weights: Weights = None, masks: Masks = None) -> Tensor:
    """DLG (Zhu et al. 2019, Eq. 4): sum over tensors of ``w_i * ||m_i * (grad'_i - grad_i)||_2^2``."""
    total = _accumulator(dummy)
    for _, a, b, w, m in _terms(dummy, target, weights, masks):
        diff = _apply_mask(a - b, m)
        total = total + w * diff.pow(2).sum()
    return total


# ----------------------------------------------------------------------------------------------------
# cosine (Inverting Gradients)
# ----------------------------------------------------------------------------------------------------
def cosine_distance(
    dummy: Sequence[Tensor],
    target: Sequence[Tensor],
    weights: Weights = None,
    masks: Masks = None,
    eps: float = 1e-8,
) -> Tensor:
    """Inverting Gradients (Geiping et al. 2020, Eq. 4): ``1 - <a, b> / (|a| |b|)`` over all tensors at once.

    The gradient lists are treated as one long vector: with ``a_i = m_i * dummy_i``, ``b_i = m_i * target_i``,

        dot = sum_i w_i <a_i, b_i>,   |a|^2 = sum_i w_i |a_i|^2,   |b|^2 = sum_i w_i |b_i|^2,

    and the result is ``1 - dot / (max(|a|, eps) * max(|b|, eps))`` (each norm is guarded separately,
    like ``torch.nn.functional.cosine_similarity``).  Values lie in ``[0, 2]``.
    """
    dot = _accumulator(dummy)
    norm_a = dot.clone()
    norm_b = dot.clone()
    for _, a, b, w, m in _terms(dummy, target, weights, masks):
        am = _apply_mask(a, m)
        bm = _apply_mask(b, m)
        dot = dot + w * (am * bm).sum()
        norm_a = norm_a + w * am.pow(2).sum()
        norm_b = norm_b + w * bm.pow(2).sum()
    denom = _safe_sqrt(norm_a).clamp_min(eps) * _safe_sqrt(norm_b).clamp_min(eps)
    return 1.0 - dot / denom


def per_layer_cosine_distance(
    dummy: Sequence[Tensor],
    target: Sequence[Tensor],
    weights: Weights = None,
    masks: Masks = None,
    eps: float = 1e-8,
) -> Tensor:
    """Weighted mean over tensors of ``1 - cos(m_i * dummy_i, m_i * target_i)``.

    ``sum_i w_i (1 - cos_i) / sum_i w_i`` over the tensors that are kept; a tensor whose mask is all
    zero is left out of both sums (it would otherwise add a constant 1).  Returns 0 when every tensor
    is removed.
    """
    total = _accumulator(dummy)
    weight_sum = total.clone()
    for _, a, b, w, m in _terms(dummy, target, weights, masks):
        am = _apply_mask(a, m)
        bm = _apply_mask(b, m)
        dot = (am * bm).sum()
        denom = _safe_sqrt(am.pow(2).sum()).clamp_min(eps) * _safe_sqrt(bm.pow(2).sum()).clamp_min(eps)
        term = 1.0 - dot / denom
        if m is not None:
            # no host sync: an all-zero mask turns the effective weight into 0
            w = w * (m.detach() != 0).any().to(total.dtype)
        total = total + w * term
        weight_sum = weight_sum + w
    return torch.where(weight_sum > 0, total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum)), total)


# ----------------------------------------------------------------------------------------------------
# 1-D Wasserstein between the entries of each tensor (WDLG)
# ----------------------------------------------------------------------------------------------------
def _check_p(p: int) -> None:
    if p not in (1, 2):
        raise ValueError(f"Wasserstein order p must be 1 or 2, got {p!r}")


def wasserstein(
    dummy: Sequence[Tensor],
    target: Sequence[Tensor],
    weights: Weights = None,
    masks: Masks = None,
    p: int = 1,
    squared: bool = False,
) -> Tensor:
    """Sum over tensors of ``w_i * W_p`` between the empirical distributions of the entries of each tensor.

    Exact closed form in one dimension: both flattened tensors (restricted to the entries the shared
    mask keeps) are sorted and the sorted vectors are compared position by position:

        W1 = mean |a_s - b_s|,    W2 = sqrt(mean (a_s - b_s)^2)   (``squared=True``: mean (a_s - b_s)^2).

    ``squared`` only affects ``p=2``.  A tensor whose mask keeps no entry is skipped.  Differentiable
    through ``torch.sort`` (the gradient is routed back through the sort permutation).

    The distance compares *distributions of values* and ignores where the values sit: it is invariant
    to any permutation of the entries within a tensor (see :func:`wasserstein_l2`).
    """
    _check_p(p)
    total = _accumulator(dummy)
    for _, a, b, w, m in _terms(dummy, target, weights, masks):
        if m is None:
            av, bv = a.reshape(-1), b.reshape(-1)
        else:
            keep = m.detach().to(device=a.device) != 0
            av, bv = a[keep], b[keep]
        if av.numel() == 0:
            continue
        diff = torch.sort(av).values - torch.sort(bv).values
        if p == 1:
            term = diff.abs().mean()
        else:
            term = diff.pow(2).mean()
            if not squared:
                term = _safe_sqrt(term)
        total = total + w * term
    return total


def wasserstein_l2(
    dummy: Sequence[Tensor],
    target: Sequence[Tensor],
    weights: Weights = None,
    masks: Masks = None,
    p: int = 1,
    squared: bool = False,
    l2_weight: float = 0.0,
) -> Tensor:
    """Mixed form: ``wasserstein(...) + l2_weight * squared_l2(...)`` with the same weights and masks.

    Trade-off: the Wasserstein term only sees the sorted values of each gradient tensor, so it is
    blind to their positions (any permutation of a tensor's entries has distance 0): it is a smooth,
    scale-aware match of the value distribution, but on its own it leaves the attack free to put the
    right values in the wrong places.  The squared L2 term is position-aware and re-anchors every entry
    to its index, at the price of DLG's sensitivity to the gradient scale.  Note the scales differ:
    W_p is a per-entry mean while squared L2 is a sum over entries, so useful ``l2_weight`` values are
    usually small (e.g. 1e-3 to 1e-1 relative to the number of entries).  ``l2_weight = 0`` is plain
    :func:`wasserstein`.
    """
    if l2_weight < 0:
        raise ValueError(f"l2_weight must be non-negative, got {l2_weight}")
    value = wasserstein(dummy, target, weights, masks, p=p, squared=squared)
    if l2_weight > 0:
        value = value + l2_weight * squared_l2(dummy, target, weights, masks)
    return value


# ----------------------------------------------------------------------------------------------------
# top-k masked cosine (GIAS)
# ----------------------------------------------------------------------------------------------------
def _check_prune_ratio(prune_ratio: float) -> None:
    if not (0.0 <= prune_ratio < 1.0):
        raise ValueError(f"prune_ratio must lie in [0, 1), got {prune_ratio}")


def topk_magnitude_masks(target: Sequence[Tensor], prune_ratio: float) -> list[Tensor]:
    """Per tensor, a 0/1 mask that keeps the ``n - floor(prune_ratio * n)`` entries of largest ``|target|``.

    Computed from the target (observed) gradient only, never from the dummy one; ties at the
    threshold are broken by ``torch.topk``.  At least one entry per tensor is kept.
    """
    _check_prune_ratio(prune_ratio)
    out = []
    with torch.no_grad():
        for t in target:
            n = t.numel()
            pruned = int(math.floor(prune_ratio * n + 1e-9))
            k = max(1, n - pruned)
            flat = t.detach().reshape(-1).abs()
            mask = torch.zeros(n, dtype=t.dtype if t.is_floating_point() else torch.float32, device=t.device)
            if k >= n:
                mask.fill_(1)
            else:
                mask[torch.topk(flat, k, sorted=False).indices] = 1
            out.append(mask.reshape(t.shape))
    return out


def topk_cosine_distance(
    dummy: Sequence[Tensor],
    target: Sequence[Tensor],
    weights: Weights = None,
    masks: Masks = None,
    prune_ratio: float = 0.0,
    eps: float = 1e-8,
) -> Tensor:
    """GIAS variant (Jeon et al. 2021): global cosine distance over the top-(1 - prune_ratio) entries.

    For every tensor the entries with the largest ``|target|`` are kept (:func:`topk_magnitude_masks`);
    if ``masks`` are given as well (e.g. gradient dropout), an entry must be kept by both.  Then
    :func:`cosine_distance` is taken over the kept entries of all tensors.  ``prune_ratio=0`` is plain
    cosine distance.
    """
    _check_prune_ratio(prune_ratio)
    _check_aligned(dummy, target, weights, masks)
    if prune_ratio > 0:
        top = topk_magnitude_masks(target, prune_ratio)
        if masks is not None:
            top = [
                t if m is None else t * _resolve_mask(m, t, i).to(dtype=t.dtype)
                for i, (t, m) in enumerate(zip(top, masks))
            ]
        masks = top
    return cosine_distance(dummy, target, weights, masks, eps=eps)


# ----------------------------------------------------------------------------------------------------
# callable classes for configs
# ----------------------------------------------------------------------------------------------------
class GradientDistance(ABC):
    """Base of the config-selectable gradient distances: ``f(dummy, target, weights=None, masks=None) -> scalar``.

    Attacks type their ``distance`` argument with this class, so a config can only name a distance (a
    subclass), never an arbitrary callable such as ``os.system`` (docs/security.md).
    """

    @abstractmethod
    def __call__(self, dummy: Sequence[Tensor], target: Sequence[Tensor], weights: Weights = None, masks: Masks = None) -> Tensor:
        """The distance between two aligned lists of gradient tensors."""


class SquaredL2Distance(GradientDistance):
    """Callable form of :func:`squared_l2`, for configs (``class_path: ...SquaredL2Distance``)."""

    def __call__(self, dummy: Sequence[Tensor], target: Sequence[Tensor], weights: Weights = None, masks: Masks = None) -> Tensor:
        return squared_l2(dummy, target, weights, masks)

    def __repr__(self) -> str:
        return "SquaredL2Distance()"


class CosineDistance(GradientDistance):
    """Callable form of :func:`cosine_distance` (``per_layer=False``) or :func:`per_layer_cosine_distance`.

    Args:
        per_layer: average ``1 - cos`` over tensors instead of one cosine over all tensors.
        eps: lower bound on each gradient norm (guards zero norms).
    """

    def __init__(self, per_layer: bool = False, eps: float = 1e-8) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.per_layer = bool(per_layer)
        self.eps = float(eps)

    def __call__(self, dummy: Sequence[Tensor], target: Sequence[Tensor], weights: Weights = None, masks: Masks = None) -> Tensor:
        fn = per_layer_cosine_distance if self.per_layer else cosine_distance
        return fn(dummy, target, weights, masks, eps=self.eps)

    def __repr__(self) -> str:
        return f"CosineDistance(per_layer={self.per_layer}, eps={self.eps})"


class WassersteinDistance(GradientDistance):
    """Callable form of :func:`wasserstein_l2` (WDLG, Wang et al. 2023).

    Args:
        p: order of the 1-D Wasserstein distance, 1 or 2.
        squared: for ``p=2``, return ``W2^2`` instead of ``W2``.
        l2_weight: weight of an added squared-L2 term that re-anchors entries to their positions
            (0 = pure Wasserstein, which is permutation invariant within a tensor).
    """

    def __init__(self, p: int = 1, squared: bool = False, l2_weight: float = 0.0) -> None:
        _check_p(p)
        if l2_weight < 0:
            raise ValueError(f"l2_weight must be non-negative, got {l2_weight}")
        self.p = int(p)
        self.squared = bool(squared)
        self.l2_weight = float(l2_weight)

    def __call__(self, dummy: Sequence[Tensor], target: Sequence[Tensor], weights: Weights = None, masks: Masks = None) -> Tensor:
        return wasserstein_l2(dummy, target, weights, masks, p=self.p, squared=self.squared, l2_weight=self.l2_weight)

    def __repr__(self) -> str:
        return f"WassersteinDistance(p={self.p}, squared={self.squared}, l2_weight={self.l2_weight})"


class TopKCosineDistance(GradientDistance):
    """Callable form of :func:`topk_cosine_distance` (GIAS, Jeon et al. 2021).

    Args:
        prune_ratio: fraction ``R`` in ``[0, 1)`` of each tensor's smallest-magnitude target entries to drop.
    """

    def __init__(self, prune_ratio: float = 0.0) -> None:
        _check_prune_ratio(prune_ratio)
        self.prune_ratio = float(prune_ratio)

    def __call__(self, dummy: Sequence[Tensor], target: Sequence[Tensor], weights: Weights = None, masks: Masks = None) -> Tensor:
        return topk_cosine_distance(dummy, target, weights, masks, prune_ratio=self.prune_ratio)

    def __repr__(self) -> str:
        return f"TopKCosineDistance(prune_ratio={self.prune_ratio})"


# ----------------------------------------------------------------------------------------------------
# cached invariants: what depends only on the target, computed once per schedule change
# ----------------------------------------------------------------------------------------------------
def _prepared_terms(target: Sequence[Tensor], weights: Weights, masks: Masks) -> list[tuple[int, Tensor, float | Tensor, Optional[Tensor]]]:
    """``(index, target_i, weight_i, float mask_i or None)`` for the kept tensors (validated once)."""
    out = []
    _check_aligned(target, target, weights, masks)
    for i, b in enumerate(target):
        w = 1.0 if weights is None else _resolve_weight(weights[i], i)
        if w is None:
            continue
        m = None if masks is None else _resolve_mask(masks[i], b, i)
        out.append((i, b, w, None if m is None else m.to(dtype=b.dtype)))
    return out


def _is_one(w: float | Tensor) -> bool:
    """A Python weight of exactly 1 (multiplying by it is the identity, so it is skipped: same value, fewer ops)."""
    return not isinstance(w, Tensor) and float(w) == 1.0


def _check_dummy(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> None:
    if len(dummy) != len(target):
        raise ValueError(f"gradient lists differ in length: {len(dummy)} vs {len(target)}")


def prepare_distance(distance: object, target: Sequence[Tensor], weights: Weights = None, masks: Masks = None):
    """A one-argument function ``dummy -> distance(dummy, target, weights, masks)`` with the target-only parts
    (masked targets, float masks, the target norm of the cosine, the validation of weights and masks)
    computed once, or None when ``distance`` has no prepared form. Same operations in the same order as the
    plain call, so the value is identical; callers re-prepare when the target, weights or masks change."""
    if distance is squared_l2 or isinstance(distance, SquaredL2Distance):
        # per kept tensor: index, target, weight (None: exactly 1, the multiplication is skipped), float mask or None
        terms = [(i, b, None if _is_one(w) else w, m) for i, b, w, m in _prepared_terms(target, weights, masks)]
        ref = list(target)
        wide = (torch.float32, torch.float64)

        def prepared_l2(dummy: Sequence[Tensor]) -> Tensor:
            _check_dummy(dummy, ref)
            # 0 + x == x exactly, so a float32/float64 sum starts from its first term (one zeros() and one add less)
            total = None if dummy and dummy[0].dtype in wide else _accumulator(dummy)
            for i, b, w, m in terms:
                a = dummy[i]
                if a.shape != b.shape:
                    raise ValueError(f"gradient {i}: dummy shape {tuple(a.shape)} != target shape {tuple(b.shape)}")
                diff = a - b
                if m is not None:
                    diff = diff * m
                sq = diff.pow(2).sum()
                if w is not None:
                    sq = w * sq
                total = sq if total is None else total + sq
            return _accumulator(dummy) if total is None else total

        return prepared_l2
    if isinstance(distance, CosineDistance) and not distance.per_layer:
        terms = _prepared_terms(target, weights, masks)
        eps = distance.eps
        ref = list(target)
        masked_targets = [b if m is None else b * m for _, b, _, m in terms]
        with torch.no_grad():
            norm_b = _accumulator(ref)
            for (_, _, w, _), bm in zip(terms, masked_targets):
                norm_b = norm_b + w * bm.pow(2).sum()
            denom_b = _safe_sqrt(norm_b).clamp_min(eps)

        def prepared_cosine(dummy: Sequence[Tensor]) -> Tensor:
            _check_dummy(dummy, ref)
            dot = _accumulator(dummy)
            norm_a = dot.clone()
            for (i, b, w, m), bm in zip(terms, masked_targets):
                if dummy[i].shape != b.shape:
                    raise ValueError(f"gradient {i}: dummy shape {tuple(dummy[i].shape)} != target shape {tuple(b.shape)}")
                am = dummy[i] if m is None else dummy[i] * m
                d, n = (am * bm).sum(), am.pow(2).sum()
                one = _is_one(w)
                dot = dot + (d if one else w * d)
                norm_a = norm_a + (n if one else w * n)
            return 1.0 - dot / (_safe_sqrt(norm_a).clamp_min(eps) * denom_b)

        return prepared_cosine
    return None
