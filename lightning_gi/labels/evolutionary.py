"""Labels of a whole batch, duplicates included: Ye et al. (AAAI 2024), Stage I.

1. **Coarse labels.** With cross-entropy and non-negative penultimate features ``h`` (ReLU), the last-layer
   weight-gradient row of class ``c`` is ``(1/N) sum_i (p_ic - y_ic) h_i``: for an early-training network
   (``p_ic`` small) the rows of the classes present are negative, the others positive. Coarse classes =
   the classes whose row MEAN is negative (:func:`coarse_labels`).
2. **Counts.** Which class appears how often is found by matching the sorted magnitudes of those rows
   with the sorted features of public images (:mod:`lightning_gi.labels.auxiliary_stats`): at the ``M``
   sorted positions ``t`` where the features of different images vary least (lowest CV), row ``c`` is
   about ``(n_c / N) * hbar_t``. The fitness of an integer count vector ``v`` (one entry per coarse class,
   each >= 1, summing to ``N``) is the cosine similarity (paper Eq. 4/6)::

       J(v) = < v hbar_t^T , G > / ( ||v hbar_t^T|| ||G|| ),     G[k, :] = sort(|grad W_fc[k_c, :]|)[t]

3. **Evolutionary search** (paper "Evolutionary matching"; authors' defaults: population 20,
   200 generations, crossover threshold 0.5):

   * rescale ``Rs``: scale to sum ``N``, floor, clamp each entry to >= 1, set the last entry so the sum
     is ``N`` (if that leaves the last entry < 1, units are taken from the largest other entries: a guard
     the paper does not need to spell out, it keeps every individual valid);
   * initial population: ``Rs(v)`` with integer entries uniform in ``[1, N - K + 1]`` (authors' code);
   * crossover: for parent ``i`` a random other parent ``j``; per entry keep ``v_i`` where ``u < 0.5``
     (``u ~ U(0,1)``), else take ``v_j``; then ``Rs``;
   * mutation: one random entry > 1 gives one unit to a random other entry;
   * selection: the child replaces its own parent only if its fitness is strictly higher (ties: parent).

   Output: each coarse class repeated ``n_c`` times, sorted by class.

Edge cases: batch size 1 -> the class with the most negative row mean; one coarse class -> all ``N``
items; more coarse classes than ``N`` -> the ``N`` most negative, once each; no negative row (e.g. a
trained model, or a defense) -> the most negative row gets all ``N``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..observation import GradientObservation, ObservationError
from .auxiliary_stats import IMAGENET_MEAN, IMAGENET_STD, AuxiliaryStats, auxiliary_stats_for_model, load_auxiliary_stats
from .base import LabelStrategy, classifier_gradients

__all__ = [
    "coarse_labels",
    "rescale_counts",
    "count_fitness",
    "evolutionary_counts",
    "CountSearchResult",
    "EvolutionaryLabelCounts",
    "CoarseLabelCounts",
    "counts_to_labels",
    "search_diagnostics",
]


def coarse_labels(weight_gradient: Tensor, batch_size: Optional[int] = None) -> Tensor:
    """Classes (sorted) whose last-layer weight-gradient row has a negative mean.

    With ``batch_size``: at most ``batch_size`` classes (the most negative means), and at least one (the
    most negative row when no mean is negative).
    """
    means = weight_gradient.detach().double().mean(dim=1)
    classes = torch.nonzero(means < 0).flatten()
    if classes.numel() == 0:
        classes = means.argmin().view(1)
    if batch_size is not None and classes.numel() > batch_size:
        order = torch.argsort(means[classes])[:batch_size]
        classes = classes[order]
    return classes.sort().values


def rescale_counts(v: np.ndarray, total: int) -> np.ndarray:
    """Paper's ``Rs``: scale to sum ``total``, floor, clamp to >= 1, last entry fixes the sum (guarded)."""
    v = np.asarray(v, dtype=np.float64)
    k = v.shape[-1]
    if k > total:
        raise ValueError(f"cannot give {k} classes at least one of {total} items")
    s = v.sum()
    scaled = v * (total / s) if s > 0 else np.full(k, total / k)
    out = np.maximum(np.floor(scaled), 1).astype(np.int64)
    out[-1] = total - out[:-1].sum()
    while out[-1] < 1:  # guard: take units from the largest other entries
        j = int(np.argmax(out[:-1]))
        out[j] -= 1
        out[-1] += 1
    return out


def count_fitness(counts: np.ndarray, gradient_rows: np.ndarray, mean_feature: np.ndarray) -> np.ndarray:
    """``J`` for one count vector ``[K]`` or a population ``[P, K]`` (cosine similarity, higher is better).

    ``gradient_rows`` ``[K, M]`` = sort(|g_c|) at the positions, ``mean_feature`` ``[M]`` = hbar at them.
    ``<v h^T, G> = v . (G h)`` and ``||v h^T|| = ||v|| ||h||``, so this is vectorised over the population.
    """
    counts = np.asarray(counts, dtype=np.float64)
    a = gradient_rows @ mean_feature  # [K]
    denom = np.linalg.norm(counts, axis=-1) * np.linalg.norm(mean_feature) * np.linalg.norm(gradient_rows)
    return (counts @ a) / np.maximum(denom, 1e-300)


@dataclass
class CountSearchResult:
    classes: Tensor  # [K] coarse classes
    counts: Tensor  # [K] counts (sum = batch size)
    fitness: float
    generations: int  # generations run
    last_improvement: int  # generation of the last accepted child that improved the best fitness

    def labels(self) -> Tensor:
        return counts_to_labels(self.classes, self.counts)


def counts_to_labels(classes: Tensor, counts: Tensor) -> Tensor:
    return torch.repeat_interleave(classes.long(), counts.long())


def evolutionary_counts(
    gradient_rows: np.ndarray,
    mean_feature: np.ndarray,
    batch_size: int,
    population: int = 20,
    generations: int = 200,
    crossover_rate: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, float, int]:
    """The evolutionary search of the paper over counts for ``K = len(gradient_rows)`` classes.

    Returns ``(best counts [K], its fitness, generation of the last improvement of the best)``.
    """
    k = gradient_rows.shape[0]
    if k < 1:
        raise ValueError("need at least one class")
    if k > batch_size:
        raise ValueError(f"{k} classes cannot all appear in a batch of {batch_size}")
    if k == 1:
        return np.array([batch_size]), 1.0, 0
    if k == batch_size:
        return np.ones(k, dtype=np.int64), float(count_fitness(np.ones(k), gradient_rows, mean_feature)), 0
    if population < 2 or generations < 0:
        raise ValueError(f"need population >= 2 and generations >= 0, got {population}, {generations}")
    rng = np.random.default_rng(seed)
    pop = np.stack([rescale_counts(rng.integers(1, batch_size - k + 2, size=k), batch_size) for _ in range(population)])
    fit = count_fitness(pop, gradient_rows, mean_feature)
    best = float(fit.max())
    last_improvement = 0
    for gen in range(1, generations + 1):
        children = np.empty_like(pop)
        for i in range(population):
            j = int(rng.integers(population - 1))
            j = j + 1 if j >= i else j  # another parent
            keep = rng.random(k) < crossover_rate
            child = rescale_counts(np.where(keep, pop[i], pop[j]), batch_size)
            big = np.flatnonzero(child > 1)
            if big.size:  # mutation: one unit from an entry > 1 to another entry
                src = int(big[rng.integers(big.size)])
                dst = int(rng.integers(k - 1))
                dst = dst + 1 if dst >= src else dst
                child[src] -= 1
                child[dst] += 1
            children[i] = child
        child_fit = count_fitness(children, gradient_rows, mean_feature)
        better = child_fit > fit  # parent wins ties
        pop[better] = children[better]
        fit = np.where(better, child_fit, fit)
        if fit.max() > best:
            best = float(fit.max())
            last_improvement = gen
    i = int(np.argmax(fit))
    return pop[i].copy(), float(fit[i]), last_improvement


def _row_matrix(weight_gradient: Tensor, classes: Tensor, positions: Tensor) -> np.ndarray:
    rows = weight_gradient.detach().double().cpu()[classes].abs()
    return torch.sort(rows, dim=1).values[:, positions].numpy()


def search_diagnostics(weight_gradient: Tensor, result: CountSearchResult, stats: AuxiliaryStats, batch_size: int) -> dict:
    """Why the search is (not) trustworthy: JSON-serialisable numbers.

    * ``cv_at_positions``: CV of the public images' sorted features at the ``M`` chosen positions (the
      method assumes every image's sorted features are ~``hbar`` there: small CV);
    * ``magnitude_ratios``: per coarse class ``k``, ``mean_t(G[k, t] / hbar_t) / (n_k / N)`` with the
      recovered ``n_k``: the ratio of that class's feature magnitude to the public mean. The counts are
      only identifiable when these agree across classes: ``magnitude_ratio_spread`` = std / mean (the
      search is exact below ~4%);
    * ``implied_counts``: the continuous least-squares counts ``N * a_k / sum(a)`` with
      ``a_k = <G[k], hbar> / ||hbar||^2`` (before the integer search), one per coarse class.
    """
    rows = _row_matrix(weight_gradient, result.classes, stats.positions)
    hbar = stats.mean_sorted.double()[stats.positions].numpy()
    counts = result.counts.double().numpy()
    per_class = (rows / np.maximum(hbar, 1e-300)).mean(axis=1)
    ratios = per_class / (counts / batch_size)
    a = rows @ hbar / max(float(hbar @ hbar), 1e-300)
    implied = batch_size * a / max(float(a.sum()), 1e-300)
    return {
        "coarse_classes": [int(c) for c in result.classes],
        "cv_at_positions": [round(float(v), 6) for v in stats.cv[stats.positions]],
        "cv_at_positions_mean": float(stats.cv[stats.positions].double().mean()),
        "magnitude_ratios": [round(float(v), 6) for v in ratios],
        "magnitude_ratio_spread": float(ratios.std() / ratios.mean()) if ratios.size > 1 else 0.0,
        "implied_counts": [round(float(v), 4) for v in implied],
    }


class EvolutionaryLabelCounts(LabelStrategy):
    """Stage I of Ye et al. (2024) as a label strategy for any attack: coarse classes + evolutionary counts.

    Args:
        stats_path: auxiliary statistics file (``python -m lightning_gi.labels.auxiliary_stats``). None:
            computed once, on first use, from ``aux_count`` offline public images on the victim itself
            (``aux_source``, at ``image_size`` with ``mean``/``std``: set them to the victim's geometry).
        num_positions: ``M``, the number of lowest-CV positions (None: those stored in the file; 20 when
            computed here).
        population, generations, crossover_rate: the search (paper: 20, 200, 0.5).
        seed: seed of the search.
        aux_source, aux_count, aux_seed, image_size, mean, std: the on-the-fly statistics (see above).

    After a call, :attr:`last_result` holds the :class:`CountSearchResult` (classes, counts, fitness) and
    :attr:`diagnostics` the numbers of :func:`search_diagnostics` (CV at the positions, spread of the
    per-class magnitude ratios, implied counts) plus ``fitness`` and ``last_improvement``.
    """

    def __init__(
        self,
        stats_path: Optional[str] = None,
        num_positions: Optional[int] = None,
        population: int = 20,
        generations: int = 200,
        crossover_rate: float = 0.5,
        seed: int = 0,
        aux_source: str = "photographs",
        aux_count: int = 40,
        aux_seed: int = 1,
        image_size: int = 224,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        if population < 2:
            raise ValueError(f"population must be >= 2, got {population}")
        if generations < 0:
            raise ValueError(f"generations must be >= 0, got {generations}")
        if not 0.0 <= crossover_rate <= 1.0:
            raise ValueError(f"crossover_rate must lie in [0, 1], got {crossover_rate}")
        self.stats_path = stats_path
        self.num_positions = num_positions
        self.population = int(population)
        self.generations = int(generations)
        self.crossover_rate = float(crossover_rate)
        self.seed = int(seed)
        self.aux_source = aux_source
        self.aux_count = int(aux_count)
        self.aux_seed = int(aux_seed)
        self.image_size = int(image_size)
        self.mean = tuple(mean) if mean is not None else IMAGENET_MEAN
        self.std = tuple(std) if std is not None else IMAGENET_STD
        self._stats: Optional[AuxiliaryStats] = None
        self.last_result: Optional[CountSearchResult] = None

    def statistics(self, model: nn.Module) -> AuxiliaryStats:
        """The auxiliary statistics (loaded from ``stats_path`` or computed on ``model``), cached."""
        if self._stats is None:
            if self.stats_path is not None:
                stats = load_auxiliary_stats(self.stats_path)
                if self.num_positions is not None:
                    stats = stats.with_positions(self.num_positions)
            else:
                stats = auxiliary_stats_for_model(
                    model, self.aux_source, self.image_size, self.aux_count, self.aux_seed, self.mean, self.std,
                    self.num_positions or 20,
                )
            self._stats = stats
        return self._stats

    def search(self, weight_gradient: Tensor, batch_size: int, stats: AuxiliaryStats) -> CountSearchResult:
        if weight_gradient.ndim != 2:
            raise ObservationError(f"expected a [classes, features] weight gradient, got {tuple(weight_gradient.shape)}")
        if weight_gradient.shape[1] != stats.feature_dim:
            raise ObservationError(
                f"the auxiliary statistics have {stats.feature_dim} features but the victim's last layer has "
                f"{weight_gradient.shape[1]} inputs: were they computed on another model?"
            )
        classes = coarse_labels(weight_gradient, batch_size)
        if batch_size == 1:
            return CountSearchResult(classes[:1], torch.ones(1, dtype=torch.long), 1.0, 0, 0)
        rows = _row_matrix(weight_gradient, classes, stats.positions)
        hbar = stats.mean_sorted.double()[stats.positions].numpy()
        counts, fitness, last = evolutionary_counts(
            rows, hbar, batch_size, self.population, self.generations, self.crossover_rate, self.seed
        )
        return CountSearchResult(classes, torch.as_tensor(counts, dtype=torch.long), fitness, self.generations, last)

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        weight, _ = classifier_gradients(observation, model)
        n = observation.batch_size
        stats = self.statistics(model) if n > 1 else None
        if stats is None:  # batch of one: the most negative row (iDLG-like), no statistics needed
            classes = coarse_labels(weight, 1)
            self.last_result = CountSearchResult(classes, torch.ones(1, dtype=torch.long), 1.0, 0, 0)
        else:
            self.last_result = self.search(weight, n, stats)
            self.note(**search_diagnostics(weight, self.last_result, stats, n))
        self.note(fitness=float(self.last_result.fitness), last_improvement=int(self.last_result.last_improvement))
        return self.last_result.labels()


class CoarseLabelCounts(LabelStrategy):
    """Baseline without auxiliary data: the coarse classes, counts from the rows' magnitudes.

    ``mode="uniform"``: ``Rs(1, ..., 1)`` (as equal as possible, remainder on the last class);
    ``mode="magnitude"``: ``Rs(|mean row|)`` (counts proportional to the row means' magnitudes).
    """

    def __init__(self, mode: str = "magnitude") -> None:
        if mode not in ("uniform", "magnitude"):
            raise ValueError(f"mode must be 'uniform' or 'magnitude', got {mode!r}")
        self.mode = mode

    def recover(self, observation: GradientObservation, model: nn.Module) -> Tensor:
        weight, _ = classifier_gradients(observation, model)
        n = observation.batch_size
        classes = coarse_labels(weight, n)
        if self.mode == "uniform":
            base = np.ones(classes.numel())
        else:
            base = (-weight.detach().double().mean(dim=1)[classes]).clamp_min(0).numpy() + 1e-12
        counts = rescale_counts(base, n) if classes.numel() > 1 else np.array([n])
        return counts_to_labels(classes, torch.as_tensor(counts))
