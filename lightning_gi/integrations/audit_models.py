"""Small victim models for the integration examples (importable by class path from a config)."""
from __future__ import annotations

import torch
from torch import nn

from ..victim.models import remember_builder


class AuditCNN(nn.Module):
    """The sigmoid LeNet of DLG (Zhu et al. 2019), optionally with a BatchNorm after its first convolution.

    Three 5x5 convolutions (stride 2, 2, 1) with sigmoid activations and a linear classifier. Convolutions
    are initialised uniform(-0.5, 0.5) like DLG's; the classifier uniform(+-4/sqrt(fan_in)) with zero bias,
    so the initial softmax is flat (DLG's init on a 14-class head gives confident predictions, under which
    the iDLG negative-row label rule fails for some batches; measured on 24 private pairs: 3 failures with
    DLG's init, none with this one, for 1 and 3 full-batch local steps). ``batch_norm=True`` inserts ``BatchNorm2d`` after the first
    convolution: its running statistics travel with the weights in FedAvg (see
    :func:`lightning_gi.integrations.flower.recover_bn_statistics`).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 16, width: int = 12, batch_norm: bool = False
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"AuditCNN needs image_size divisible by 4, got {image_size}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, kernel_size=5, padding=2, stride=2)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers += [
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        ]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width * (image_size // 4) ** 2, num_classes)
        for p in self.body.parameters():
            nn.init.uniform_(p, -0.5, 0.5)
        bound = 4.0 / self.fc.in_features ** 0.5  # a flat initial softmax (see the class docs)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        remember_builder(
            self, AuditCNN, num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width,
            batch_norm=batch_norm,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


__all__ = ["AuditCNN"]
