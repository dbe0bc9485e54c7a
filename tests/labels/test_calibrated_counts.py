"""CalibratedCounts: iLRG's count system with class probabilities measured on labelled public images.

A small CNN is trained until it is confident on four classes of the bundled photographs; the attacked batch,
the public images and the training images are disjoint crops. Every gradient comes from a real backward pass.
"""
import numpy as np
import pytest
import torch
from torch import nn

from lightning_gi.labels import ILRG, LLG, CalibratedCounts, label_strategy
from lightning_gi.observation import ObservationError, capture_observation
from lightning_gi.victim.data import BundledPhotographs


def _counts(labels, c=20):
    return np.bincount(labels.numpy(), minlength=c)


@pytest.fixture(scope="module")
def confident_case():
    data = BundledPhotographs(image_size=16, crops_per_photo=30)
    keep = [i for i, t in enumerate(data.targets) if t < 4]
    images = data.images[keep]
    labels = torch.tensor([data.targets[i] for i in keep]) * 5  # classes 0, 5, 10, 15 of a 20-class head
    split = torch.arange(len(keep)) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 20))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_x, train_y = images[split == 0], labels[split == 0]
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        opt.step()
    model.eval()
    attack_x, attack_y = images[split == 2], labels[split == 2]
    gen = torch.Generator().manual_seed(3)
    pick = torch.cat([torch.nonzero(attack_y == c).flatten()[torch.randperm(10, generator=gen)[:k]]
                      for c, k in zip((0, 5, 10, 15), (9, 3, 12, 8))])
    return model, attack_x[pick], attack_y[pick], images[split == 1], labels[split == 1]


def test_calibrated_counts_beat_ilrg_and_llg_on_a_confident_victim(confident_case):
    model, x, y, public_x, public_y = confident_case
    with torch.no_grad():
        assert float(torch.softmax(model(x), 1).gather(1, y[:, None]).mean()) > 0.6  # a victim that has learned
    obs = capture_observation(model, x, y)
    truth = _counts(y)
    off = {name: np.abs(_counts(s(obs, model)) - truth).sum() / 2
           for name, s in {"calibrated": CalibratedCounts.from_tensors(public_x, public_y), "ilrg": ILRG(refine_steps=6),
                           "llg": LLG()}.items()}
    assert off["calibrated"] < off["ilrg"] and off["calibrated"] < off["llg"], off
    assert off["calibrated"] <= 0.5 * min(off["ilrg"], off["llg"]), off  # measured: 6 vs 24 and 19 of 32


def test_public_file_round_trip_and_clear_errors(confident_case, tmp_path):
    model, x, y, public_x, public_y = confident_case
    obs = capture_observation(model, x, y)
    path = tmp_path / "public.pt"
    torch.save({"images": public_x, "labels": public_y}, path)
    from_file = label_strategy("calibrated", public_path=str(path))
    assert torch.equal(from_file(obs, model), CalibratedCounts.from_tensors(public_x, public_y)(obs, model))
    assert from_file.diagnostics["public_classes"] == 4 and from_file.diagnostics["public_p_true"] > 0.5
    with pytest.raises(ValueError, match="does not exist"):
        CalibratedCounts(public_path=str(tmp_path / "missing.pt"))(obs, model)
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a readable tensor file"):
        CalibratedCounts(public_path=str(tmp_path / "junk.pt"))(obs, model)
    torch.save({"images": public_x}, tmp_path / "nolabels.pt")
    with pytest.raises(ValueError, match="'images' and 'labels'"):
        CalibratedCounts(public_path=str(tmp_path / "nolabels.pt"))(obs, model)
    with pytest.raises(ValueError, match="needs labelled public images"):
        CalibratedCounts()(obs, model)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 20, bias=False))
    with pytest.raises(ObservationError, match="needs a bias"):
        CalibratedCounts.from_tensors(public_x, public_y)(capture_observation(plain, x, y), plain)
