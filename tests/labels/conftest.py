"""Shared victims of the label tests."""
import pytest
import torch
from torch import nn

from lightning_gi.victim.data import BundledPhotographs


@pytest.fixture(scope="module")
def confident_case():
    """A small CNN trained until confident on four classes of the bundled photographs (classes 0, 5, 10, 15 of a
    20-class head); (model, attacked images, their labels, public images, their labels): disjoint crops."""
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
