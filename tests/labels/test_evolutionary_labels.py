"""Stage I of Ye et al. (2024): coarse labels, auxiliary statistics, the evolutionary count search."""
import numpy as np
import pytest
import torch
from torch import nn

from lightning_gi.labels import (
    CoarseLabelCounts,
    EvolutionaryLabelCounts,
    IDLGLabels,
    auxiliary_stats_for_model,
    coarse_labels,
    evolutionary_counts,
    load_auxiliary_stats,
    save_auxiliary_stats,
)
from lightning_gi.labels.auxiliary_stats import compute_auxiliary_stats, main as aux_main, penultimate_features
from lightning_gi.labels.evolutionary import count_fitness, rescale_counts
from lightning_gi.observation import GradientObservation, ObservationError, capture_observation


# ---------------------------------------------------------------------------------------- synthetic model
class FeatureHead(nn.Module):
    """Identity 'backbone' + linear head: the penultimate features ARE the inputs."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)
        nn.init.zeros_(self.fc.weight)  # p = 1/classes for every input (early-training regime)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(x.flatten(1))


def paper_model_features(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Features that satisfy the paper's model: every image's sorted feature vector is the same profile
    (a common mean sorted feature), the entries only permuted differently per image, plus a little noise."""
    profile = torch.linspace(0.05, 2.0, dim) ** 2
    feats = []
    for _ in range(n):
        perm = torch.randperm(dim, generator=gen)
        noise = 1 + 0.01 * torch.randn(dim, generator=gen)
        feats.append(profile[perm] * noise.abs())
    return torch.stack(feats)


def synthetic_case(counts: dict[int, int], classes: int = 1000, dim: int = 64, seed: int = 0):
    """A real gradient of a linear head on features that follow the paper's model, one shared 'sorted
    profile' per image; the same images' classes share the same feature vector (so the sorted sum of a
    class's features is exactly n_c times the profile)."""
    gen = torch.Generator().manual_seed(seed)
    model = FeatureHead(dim, classes)
    labels, feats = [], []
    for c, m in counts.items():
        f = paper_model_features(1, dim, gen)
        for _ in range(m):
            labels.append(c)
            feats.append(f[0])
    x = torch.stack(feats).view(len(feats), 1, 8, dim // 8)  # 'images' whose flattening is the features
    y = torch.tensor(labels)
    obs = capture_observation(model, x, y)
    aux = compute_auxiliary_stats(paper_model_features(40, dim, torch.Generator().manual_seed(seed + 100)), 20)
    return model, obs, y, aux


def sorted_multiset(t):
    return sorted(t.tolist())


@pytest.mark.parametrize(
    "counts",
    [
        {3: 4, 17: 2, 40: 2},  # 8 images from 3 classes
        {1: 5, 2: 5, 9: 1, 77: 3, 500: 2},  # 16 from 5
        {i * 7: n for i, n in enumerate([9, 1, 4, 4, 2, 6, 3, 3])},  # 32 from 8
        {i * 13 + 5: n for i, n in enumerate([12, 3, 1, 7, 9, 2, 5, 8, 6, 11])},  # 64 from 10
    ],
)
def test_evolutionary_search_finds_exact_counts_on_paper_model(counts):
    model, obs, y, aux = synthetic_case(counts)
    strategy = EvolutionaryLabelCounts(seed=0)
    strategy._stats = aux  # the auxiliary statistics of public images under the same model
    labels = strategy(obs, model)
    assert sorted_multiset(labels) == sorted_multiset(y)
    assert strategy.last_result.classes.tolist() == sorted(counts)
    assert strategy.last_result.fitness > 0.999
    # the batch rule of distinct labels cannot express duplicates
    assert sorted_multiset(IDLGLabels()(obs, model)) != sorted_multiset(y)


def test_search_is_seeded_and_fast():
    counts = {i * 7: n for i, n in enumerate([9, 1, 4, 4, 2, 6, 3, 3])}
    model, obs, _, aux = synthetic_case(counts, seed=3)
    a = EvolutionaryLabelCounts(seed=5)
    a._stats = aux
    b = EvolutionaryLabelCounts(seed=5)
    b._stats = aux
    import time

    t = time.perf_counter()
    la = a(obs, model)
    assert time.perf_counter() - t < 5.0  # paper: < 1 s (200 generations, population 20)
    assert la.tolist() == b(obs, model).tolist()


def test_rescale_matches_paper_definition():
    # scale to sum N, floor, clamp >= 1, last entry fixes the sum
    assert rescale_counts(np.array([1.0, 1.0, 2.0]), 8).tolist() == [2, 2, 4]
    assert rescale_counts(np.array([0.01, 5.0, 5.0]), 10).tolist() == [1, 4, 5]
    assert rescale_counts(np.array([3, 3, 3]), 10).sum() == 10
    # guard: clamping pushes the last entry below 1 -> units come from the largest other entries
    out = rescale_counts(np.array([0.001, 0.001, 0.001, 10.0, 0.0]), 5)
    assert out.sum() == 5 and out.min() >= 1
    with pytest.raises(ValueError):
        rescale_counts(np.ones(4), 3)


def test_fitness_is_cosine_of_outer_product():
    rng = np.random.default_rng(0)
    g = rng.random((3, 5))
    h = rng.random(5)
    v = np.array([2.0, 1.0, 5.0])
    outer = v[:, None] * h[None, :]
    expected = (outer * g).sum() / np.linalg.norm(outer) / np.linalg.norm(g)
    assert count_fitness(v, g, h) == pytest.approx(expected)
    pop = np.stack([v, v * 2, np.array([1.0, 1.0, 1.0])])
    f = count_fitness(pop, g, h)
    assert f[0] == pytest.approx(f[1])  # scale-invariant


# ------------------------------------------------------------------------------------------- edge cases
def test_batch_of_one_needs_no_statistics():
    model, obs, y, _ = synthetic_case({42: 1})
    strategy = EvolutionaryLabelCounts(stats_path="/nonexistent/file.pt")  # never opened for N = 1
    assert strategy(obs, model).tolist() == [42]


def test_single_class_gets_all_items():
    model, obs, y, aux = synthetic_case({7: 6})
    strategy = EvolutionaryLabelCounts()
    strategy._stats = aux
    assert strategy(obs, model).tolist() == [7] * 6


def test_more_coarse_classes_than_batch_items():
    # a gradient with 5 negative rows but a claimed batch size of 3: the 3 most negative, once each
    w = torch.ones(10, 4)
    for c, v in [(1, -5.0), (2, -1.0), (4, -3.0), (6, -0.5), (8, -4.0)]:
        w[c] = v
    assert coarse_labels(w, 3).tolist() == [1, 4, 8]
    counts, fit, _ = evolutionary_counts(np.ones((3, 2)), np.ones(2), 3)
    assert counts.tolist() == [1, 1, 1]
    # no negative row at all: the most negative row takes everything
    assert coarse_labels(torch.arange(1.0, 5.0).view(4, 1).expand(4, 3) + 0.0, 4).tolist() == [0]


def test_more_coarse_classes_than_batch_through_strategy():
    model, obs, _, aux = synthetic_case({1: 1, 2: 1, 3: 1, 4: 1})
    w = obs.gradients[0].clone()
    fake = GradientObservation([w, obs.gradients[1]], batch_size=2)
    strategy = EvolutionaryLabelCounts()
    strategy._stats = aux
    labels = strategy(fake, model)
    assert labels.numel() == 2 and len(set(labels.tolist())) == 2


def test_statistics_feature_dim_must_match():
    model, obs, _, aux = synthetic_case({3: 2, 4: 2}, dim=64)
    strategy = EvolutionaryLabelCounts()
    strategy._stats = compute_auxiliary_stats(torch.rand(10, 32) + 0.1, 5)
    with pytest.raises(ObservationError, match="another model"):
        strategy(obs, model)


# ------------------------------------------------------------------------------ auxiliary statistics
def test_auxiliary_statistics_definition():
    feats = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 5.0], [0.0, 2.0, 2.0]])
    stats = compute_auxiliary_stats(feats, num_positions=2)
    sorted_f = torch.sort(feats, dim=1).values
    assert torch.allclose(stats.mean_sorted, sorted_f.mean(0))
    assert torch.allclose(stats.cv, sorted_f.std(0, unbiased=False) / sorted_f.mean(0))
    assert stats.positions.tolist() == torch.argsort(stats.cv)[:2].tolist()
    # positions whose mean is 0 (dead ReLU features) are never chosen
    stats = compute_auxiliary_stats(torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.5, 2.0]]), num_positions=3)
    assert 0 not in stats.positions.tolist() and len(stats.positions) == 2


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_statistics_file_roundtrip_and_command(tmp_path, ext):
    from lightning_gi.victim import torchvision_classifier

    torch.manual_seed(0)
    model = torchvision_classifier("resnet18", num_classes=20).eval()
    stats = auxiliary_stats_for_model(model, image_size=32, count=8, num_positions=5)
    path = tmp_path / f"stats{ext}"
    save_auxiliary_stats(stats, path)
    back = load_auxiliary_stats(path)
    assert torch.equal(back.positions, stats.positions) and torch.allclose(back.mean_sorted, stats.mean_sorted)
    assert back.feature_dim == 512 and back.num_images == 8
    # the command writes the same kind of file
    out = tmp_path / f"cmd{ext}"
    aux_main(["--model", "resnet18", "--num-classes", "20", "--model-seed", "0", "--image-size", "32",
              "--count", "6", "--positions", "4", "--out", str(out)])
    cmd = load_auxiliary_stats(out)
    assert cmd.positions.numel() == 4 and cmd.num_images == 6
    assert EvolutionaryLabelCounts(stats_path=str(out)).statistics(model).feature_dim == 512


def test_penultimate_features_read_fc_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 3, 2, 2)
    expected = torch.relu(model[1](x.flatten(1)))
    assert torch.allclose(penultimate_features(model, x, batch_size=2), expected, atol=1e-6)


def test_real_victim_batch_with_duplicates_end_to_end():
    """Bundled photographs, untrained ResNet-18 with a 1000-class head (p ~ 1/1000 as in the paper's
    ImageNet setting): the coarse classes are exactly the classes present, and the strategy returns a
    full-size label vector made of them (exact counts on real features are measured in benchmarks/)."""
    from lightning_gi.victim.calibration import bn_calibrated_classifier
    from lightning_gi.victim.data import BundledPhotographs, select_batch

    model = bn_calibrated_classifier("resnet18", 1000, image_size=32, seed=0, crops_per_photo=2)
    photos = BundledPhotographs(image_size=32, crops_per_photo=4)
    x, y, _ = select_batch(photos, 8, seed=0, label_mode="repeated", num_distinct=3)
    m = torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1)
    s = torch.tensor([0.229, 0.224, 0.225]).view(-1, 1, 1)
    obs = capture_observation(model, (x - m) / s, y)
    strategy = EvolutionaryLabelCounts(image_size=32, aux_count=16)
    labels = strategy(obs, model)
    assert labels.numel() == 8
    assert sorted(set(labels.tolist())) == sorted(set(y.tolist()))
    assert CoarseLabelCounts("uniform")(obs, model).numel() == 8
