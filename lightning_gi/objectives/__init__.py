"""Gradient distances and image priors for gradient inversion attacks."""
from lightning_gi.objectives.distances import (
    CosineDistance,
    GradientDistance,
    SquaredL2Distance,
    TopKCosineDistance,
    WassersteinDistance,
    cosine_distance,
    per_layer_cosine_distance,
    squared_l2,
    topk_cosine_distance,
    topk_magnitude_masks,
    wasserstein,
    wasserstein_l2,
)
from lightning_gi.objectives.priors import BNStatisticsPrior, L2ImageNorm, TotalVariation

__all__ = [
    "squared_l2",
    "cosine_distance",
    "per_layer_cosine_distance",
    "wasserstein",
    "wasserstein_l2",
    "topk_magnitude_masks",
    "topk_cosine_distance",
    "SquaredL2Distance",
    "CosineDistance",
    "GradientDistance",
    "WassersteinDistance",
    "TopKCosineDistance",
    "TotalVariation",
    "L2ImageNorm",
    "BNStatisticsPrior",
]
