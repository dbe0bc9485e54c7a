"""Victim architectures: the DLG sigmoid LeNet and torchvision classifiers by name.

Any ``nn.Module`` can be a victim (configs give ``class_path`` + ``init_args``); these are the ones the
papers use. Pretrained weights load only from local files (see checkpoints/README.md). An untrained victim
(``model_seed``) is rebuilt through its own constructor under the seed (:func:`reinitialise`), so it carries
the architecture's own initialisation, exactly as ``torch.manual_seed(seed); Model(**kwargs)``.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Literal, Any, Callable, Optional

import torch
from torch import nn

from ..checkpoints import CorruptCheckpointError, load_state_dict_file


def classifier_head(model: nn.Module) -> Optional[tuple[str, nn.Linear]]:
    """``(name, module)`` of the model's last ``nn.Linear`` (the classifier head whose gradient rows label rules
    read and whose width is the number of classes), or None when the model has no linear layer."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


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
        if type(self) is LeNet:
            remember_builder(self, LeNet, num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)

    def init_weights(self) -> None:
        """DLG's initialisation: every weight and bias uniform(-0.5, 0.5) (global RNG)."""
        for p in self.parameters():
            nn.init.uniform_(p, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class ConvNet(nn.Module):
    """A small ReLU ConvNet (the kind of victim Inverting Gradients, Geiping et al. 2020, also attacks).

    ``depth`` blocks of 3x3 convolution + ReLU; every block after the first halves the resolution (stride 2)
    and doubles the width, then a linear head on the flattened feature map (``head="flatten"``, which needs
    ``image_size``) or on its global average (``head="pool"``); ``norm="batch"`` adds BatchNorm after each
    convolution (for the BN-statistics prior of GradInversion). A flattened head's weight gradient is the
    feature map times the output error, so it leaks far more than a pooled one. PyTorch's default initialisation
    (kaiming-uniform), so ``model_seed`` re-draws it exactly as the constructor would. Small enough that an
    inversion runs thousands of steps on a CPU in minutes, which makes it the offline demos' untrained victim.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 32,
        depth: int = 3,
        head: Literal["flatten", "pool"] = "flatten",
        image_size: int = 32,
        norm: Literal["none", "batch"] = "none",
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"ConvNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        if head not in ("flatten", "pool"):
            raise ValueError(f"ConvNet head must be 'flatten' or 'pool', got {head!r}")
        stride = 2 ** (depth - 1)
        if head == "flatten" and image_size % stride:
            raise ValueError(f"ConvNet with depth {depth} needs image_size divisible by {stride}, got {image_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for k in range(depth):
            out = width * 2**k
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1, stride=1 if k == 0 else 2))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        self.body = nn.Sequential(*layers)
        self.head = head
        features = channels * (image_size // stride) ** 2 if head == "flatten" else channels
        self.fc = nn.Linear(features, num_classes)
        if type(self) is ConvNet:
            remember_builder(
                self, ConvNet, num_classes=num_classes, in_channels=in_channels, width=width, depth=depth,
                head=head, image_size=image_size, norm=norm,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.fc(h.flatten(1) if self.head == "flatten" else h.mean(dim=(-2, -1)))


_BUILDER_ATTR = "_lightning_gi_builder"


def remember_builder(model: nn.Module, builder: Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """Record how ``model`` was built (``builder(**kwargs)``) so :func:`reinitialise` can rebuild it exactly.

    :class:`LeNet` and :func:`torchvision_classifier` record themselves; call this for a user model whose
    constructor arguments are not stored as attributes of the same names.
    """
    if not callable(builder):
        raise TypeError(f"builder must be callable, got {type(builder).__name__}")
    object.__setattr__(model, _BUILDER_ATTR, (builder, dict(kwargs)))
    return model


_PLAIN = (int, float, str, bool, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _builder_of(model: nn.Module) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """(builder, kwargs): the recorded one, else ``type(model)`` with its constructor arguments read back from
    same-named attributes of the instance (constructor defaults for the others)."""
    recorded = getattr(model, _BUILDER_ATTR, None)
    if recorded is not None:
        return recorded
    found = _torchvision_builder(model)
    if found is not None:
        return found
    cls = type(model)
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        sig = None
    if sig is None:
        raise ValueError(f"cannot read the constructor of {cls.__name__}: use remember_builder() to seed it")
    kwargs: dict[str, Any] = {}
    for name, par in sig.parameters.items():
        if par.kind in (par.VAR_POSITIONAL, par.VAR_KEYWORD):
            continue
        value = model.__dict__.get(name, inspect.Parameter.empty)
        if value is not inspect.Parameter.empty and _is_plain(value):
            kwargs[name] = value
        elif par.default is inspect.Parameter.empty:
            raise ValueError(
                f"cannot rebuild {cls.__name__} for model_seed: its constructor argument '{name}' is not stored "
                f"on the instance; call lightning_gi.victim.models.remember_builder(model, {cls.__name__}, ...)"
            )
    return cls, kwargs


def _torchvision_builder(model: nn.Module) -> Optional[tuple[Callable[..., nn.Module], dict[str, Any]]]:
    """A torchvision classification model built elsewhere (e.g. ``class_path: torchvision.models.resnet18``):
    the builder whose architecture has exactly this model's parameter shapes (compared on the meta device)."""
    if not type(model).__module__.startswith("torchvision.models"):
        return None
    import torchvision

    head = classifier_head(model)
    if head is None:
        return None
    num_classes = head[1].out_features
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.random.fork_rng(devices=[]):
        for name in torchvision.models.list_models(module=torchvision.models):
            if torchvision.models.get_model_builder(name).__module__ != type(model).__module__:
                continue  # another family: not built at all
            try:
                with torch.device("meta"):
                    candidate = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
            except Exception:  # noqa: BLE001 - builders with other required arguments are simply not candidates
                continue
            if type(candidate) is type(model) and {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
                return torchvision_classifier, {"name": name, "num_classes": num_classes, "weights_path": None, "in_channels": 3}
    return None


def seeded_build(builder: Callable[..., nn.Module], seed: int, /, **kwargs: Any) -> nn.Module:
    """``torch.manual_seed(seed); builder(**kwargs)`` on a forked CPU RNG: the global stream is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return builder(**kwargs)


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw a model's random initialisation from ``seed`` with the architecture's own init (in place).

    The model is rebuilt through its own constructor under ``torch.manual_seed(seed)`` (forked RNG, so the
    global stream is untouched) and the fresh parameters and buffers are copied in, so the result equals
    ``torch.manual_seed(seed); Model(**kwargs)`` exactly: torchvision's kaiming_normal(fan_out) ResNet init,
    DLG's uniform(-0.5, 0.5) LeNet init, a user class's own init. Constructor arguments come from
    :func:`remember_builder` records (LeNet, torchvision_classifier) or same-named instance attributes.
    A recorded ``weights_path`` is dropped (a seed means untrained); a builder with a ``seed_argument``
    attribute gets the seed through that argument instead.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"model seed must be an int, got {seed!r}")
    seed = int(seed)
    builder, kwargs = _builder_of(model)
    kwargs = dict(kwargs)
    if "weights_path" in kwargs:
        kwargs["weights_path"] = None
    seed_argument = getattr(builder, "seed_argument", None)
    if seed_argument:  # a factory that seeds itself (e.g. bn_calibrated_classifier's ``seed``)
        kwargs[seed_argument] = seed
    fresh = seeded_build(builder, seed, **kwargs)
    own, new = model.state_dict(), fresh.state_dict()
    if own.keys() != new.keys() or any(own[k].shape != new[k].shape for k in own):
        bad = sorted(k for k in own.keys() ^ new.keys())[:3] or [k for k in own if own[k].shape != new[k].shape][:3]
        raise ValueError(
            f"rebuilding {type(model).__name__} from its constructor gave different parameters ({bad}); "
            f"record the exact constructor with lightning_gi.victim.models.remember_builder"
        )
    with torch.no_grad():
        model.load_state_dict(new, strict=True)
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

    Built with ``num_classes`` directly, so the classifier head gets the architecture's own initialisation
    (global RNG, like any constructor: seed it with ``model_seed``). With ``weights_path`` the file's state
    dict is loaded (e.g. torchvision's ImageNet file ``resnet34-b627a593.pth``, resolved through
    checkpoints/); when ``num_classes`` differs from the file's, every weight but the head's is loaded and
    the head keeps its fresh initialisation. ``in_channels != 3`` replaces the first convolution by one of
    the same geometry initialised like the architecture's (kaiming_normal fan_out for ResNet/VGG/MobileNet/
    EfficientNet/MNASNet/RegNet, PyTorch's default otherwise). Nothing is downloaded.
    """
    import torchvision

    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as err:
        raise ValueError(f"unknown torchvision model '{name}': {err}") from None
    model = builder(weights=None, num_classes=num_classes)
    if weights_path is not None:
        sd = load_state_dict_file(weights_path, what=f"torchvision {name} weights")
        head = _head_keys(model)
        file_classes = [int(sd[k].shape[0]) for k in head if k in sd and k.endswith("weight")]
        if file_classes and file_classes[0] != num_classes:
            sd = {k: v for k, v in sd.items() if k not in head}
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if unexpected or [k for k in missing if not (file_classes and k in head)]:
                raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        except RuntimeError as err:
            raise CorruptCheckpointError(f"weights file '{weights_path}' does not fit torchvision {name}: {err}") from None
    if in_channels != 3:
        _replace_stem(model, in_channels, name)
    return remember_builder(
        model, torchvision_classifier, name=name, num_classes=num_classes, weights_path=weights_path, in_channels=in_channels
    )


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head (the last nn.Linear)."""
    head = classifier_head(model)
    if head is None:
        raise ValueError(f"cannot find the classifier head of {type(model).__name__}")
    return {f"{head[0]}.weight", f"{head[0]}.bias"}


_FAN_OUT_FAMILIES = ("resnet", "resnext", "wide_resnet", "vgg", "mobilenet", "efficientnet", "mnasnet", "regnet")


def _replace_stem(model: nn.Module, in_channels: int, name: str = "") -> None:
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(
                in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                groups=1, bias=mod.bias is not None,
            )
            if name.lower().startswith(_FAN_OUT_FAMILIES):
                nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
                if new.bias is not None:
                    nn.init.zeros_(new.bias)
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, path.rsplit(".", 1)[-1], new)
            return
    raise ValueError(f"cannot find the first convolution of {type(model).__name__} to change its input channels")
