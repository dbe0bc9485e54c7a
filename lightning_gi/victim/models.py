"""Victim architectures: the DLG sigmoid LeNet and torchvision classifiers by name.

Any ``nn.Module`` can be a victim (configs give ``class_path`` + ``init_args``); these are the ones the
papers use. Pretrained weights load only from local files (see checkpoints/README.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..checkpoints import CorruptCheckpointError, load_state_dict_file


class LeNet(nn.Module):
    """The sigmoid LeNet of DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020).

    Three 5x5 convolutions (stride 2, 2, 1) with sigmoid activations and one linear layer; all weights
    and biases uniform(-0.5, 0.5). Sigmoid keeps the classifier's input positive, which is what makes
    the iDLG label rule exact. ``image_size`` fixes the linear layer's width (768 for 32x32, 588 for 28x28).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 12) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"LeNet needs image_size divisible by 4, got {image_size}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(width * (image_size // 4) ** 2, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """DLG's initialisation: every weight and bias uniform(-0.5, 0.5) (global RNG)."""
        for p in self.parameters():
            nn.init.uniform_(p, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw a model's random initialisation from ``seed`` (for 'random network per seed' studies).

    Calls ``reset_parameters`` on every submodule that has it, then the model's own ``init_weights``
    when present, under a forked RNG so the global stream is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if hasattr(model, "init_weights"):
            model.init_weights()
    return model


def load_weights(model: nn.Module, weights_path: str, strict: bool = True) -> nn.Module:
    """Load a local state dict (.pt/.pth/.safetensors; weights_only) into ``model`` with clear errors."""
    sd = load_state_dict_file(weights_path, what=f"weights for {type(model).__name__}")
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as err:
        raise CorruptCheckpointError(
            f"weights file '{weights_path}' does not fit {type(model).__name__}: {err}"
        ) from None
    return model


def torchvision_classifier(
    name: str = "resnet18",
    num_classes: int = 10,
    weights_path: Optional[str] = None,
    in_channels: int = 3,
) -> nn.Module:
    """A torchvision classification model by name (``resnet18``, ``resnet34``, ``vgg11``, ...).

    With ``weights_path`` the file's state dict is loaded (e.g. torchvision's ImageNet file
    ``resnet34-b627a593.pth``, resolved through checkpoints/); the classifier head is replaced only when
    ``num_classes`` differs from the file's. Nothing is downloaded.
    """
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as err:
        raise ValueError(f"unknown torchvision model '{name}': {err}") from None
    if weights_path is None:
        model = builder(weights=None, num_classes=num_classes)
    else:
        sd = load_state_dict_file(weights_path, what=f"torchvision {name} weights")
        head = [k for k, v in sd.items() if k.endswith("weight") and v.ndim == 2][-1:]
        file_classes = int(sd[head[0]].shape[0]) if head else num_classes
        model = builder(weights=None, num_classes=file_classes)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise CorruptCheckpointError(f"weights file '{weights_path}' does not fit torchvision {name}: {err}") from None
        if file_classes != num_classes:
            _replace_head(model, num_classes)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    for attr in ("fc", "classifier", "head"):
        mod = getattr(model, attr, None)
        if isinstance(mod, nn.Linear):
            setattr(model, attr, nn.Linear(mod.in_features, num_classes))
            return
        if isinstance(mod, nn.Sequential) and isinstance(mod[-1], nn.Linear):
            mod[-1] = nn.Linear(mod[-1].in_features, num_classes)
            return
    raise ValueError(f"cannot find the classifier head of {type(model).__name__} to resize it")


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, bias=mod.bias is not None)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return
