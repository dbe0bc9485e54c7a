"""What the attacker observes: the client's shared gradient, as a file any PyTorch code can write.

The on-disk format (documented in docs/observation_format.md) is a plain ``torch.save``d dict, so a
user can capture a gradient in their own FL stack without importing lightning_gi::

    {"format_version": 1,
     "gradients": [t0, t1, ...],    # torch.autograd.grad(mean CE loss, list(model.parameters()))
     "batch_size": 8,
     "labels": LongTensor[8],       # optional: only when the client shares them
     "param_names": [...],          # optional: names in model.named_parameters() order
     "metadata": {...},             # optional: str/int/float/bool values; "mean"/"std": lists of floats
     "buffers": {name: tensor}}     # optional, format_version 2: the client's buffers after its update

It loads with ``torch.load(weights_only=True)``: no code in the file is ever executed.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .files import save_atomic

FORMAT_VERSION = 2
"""Newest version; a file without ``buffers`` is still written as version 1 (readable by older releases)."""
SUPPORTED_VERSIONS = (1, 2)
_KNOWN_KEYS = {"format_version", "gradients", "batch_size", "labels", "param_names", "metadata", "loss_reduction", "buffers"}
_VERSION_2_KEYS = {"buffers"}
MAX_BATCH_SIZE = 4096
"""Largest batch an observation may claim: an attack allocates one dummy image per sample."""


_LIST_METADATA = ("mean", "std")
"""Metadata keys that hold a list of numbers (the victim's input normalisation, one value per channel)."""


def _is_number_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and 0 < len(value) <= 64 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )


class ObservationError(ValueError):
    """A gradient observation is malformed or does not fit the victim model."""


@dataclass
class GradientObservation:
    """The client's shared update as seen by the attacker (FedSGD: one batch-mean gradient).

    ``gradients`` are aligned with ``list(model.parameters())`` of the victim. ``buffers`` (format version 2,
    optional): the buffers the client shared with its update, e.g. BN running statistics after FedAvg's local
    training (``model.named_buffers()`` names).
    """

    gradients: list[Tensor]
    batch_size: int
    labels: Optional[Tensor] = None
    param_names: Optional[list[str]] = None
    loss_reduction: str = "mean"
    metadata: dict[str, Any] = field(default_factory=dict)
    buffers: Optional[dict[str, Tensor]] = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def _name(self, i: int) -> str:
        if self.param_names is not None and i < len(self.param_names):
            return f"gradients[{i}] ({self.param_names[i]})"
        return f"gradients[{i}]"

    def validate(self) -> None:
        """Check types, finiteness and label consistency; raise :class:`ObservationError` naming the culprit."""
        if not isinstance(self.gradients, (list, tuple)) or len(self.gradients) == 0:
            raise ObservationError("'gradients' must be a non-empty list of tensors (model.parameters() order)")
        self.gradients = list(self.gradients)
        for i, g in enumerate(self.gradients):
            if not isinstance(g, Tensor):
                raise ObservationError(f"{self._name(i)} is a {type(g).__name__}, expected a torch.Tensor")
            if g.layout != torch.strided:
                raise ObservationError(f"{self._name(i)} is a {g.layout} tensor, expected a dense tensor (call .to_dense())")
            if g.is_meta:
                raise ObservationError(f"{self._name(i)} is a meta tensor without data")
            if g.is_quantized or g.is_complex():
                raise ObservationError(f"{self._name(i)} has dtype {g.dtype}, expected a real floating-point tensor")
            if not torch.is_floating_point(g):
                raise ObservationError(f"{self._name(i)} has dtype {g.dtype}, expected a floating-point tensor")
            if not bool(torch.isfinite(g).all()):
                bad = int((~torch.isfinite(g)).sum())
                raise ObservationError(f"{self._name(i)} contains {bad} NaN/inf entries: the observation is unusable")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ObservationError(f"'batch_size' must be a positive int, got {self.batch_size!r}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise ObservationError(
                f"'batch_size' is {self.batch_size}, above the supported maximum of {MAX_BATCH_SIZE} images"
            )
        if self.param_names is not None:
            if not isinstance(self.param_names, (list, tuple)) or not all(isinstance(n, str) for n in self.param_names):
                raise ObservationError("'param_names' must be a list of strings")
            self.param_names = list(self.param_names)
            if len(set(self.param_names)) != len(self.param_names):
                dup = sorted({n for n in self.param_names if self.param_names.count(n) > 1})
                raise ObservationError(f"'param_names' lists {dup} more than once")
            if len(self.param_names) != len(self.gradients):
                raise ObservationError(
                    f"'param_names' has {len(self.param_names)} entries but 'gradients' has {len(self.gradients)}"
                )
        if self.labels is not None:
            if not isinstance(self.labels, Tensor) or self.labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ObservationError("'labels' must be an integer tensor of shape [batch_size]")
            self.labels = self.labels.long().reshape(-1)
            if self.labels.numel() != self.batch_size:
                raise ObservationError(
                    f"'labels' has {self.labels.numel()} entries but 'batch_size' is {self.batch_size}"
                )
            if bool((self.labels < 0).any()):
                raise ObservationError(f"'labels' contains negative values: {self.labels.tolist()}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ObservationError(f"'loss_reduction' must be 'mean' or 'sum', got {self.loss_reduction!r}")
        if self.buffers is not None:
            if not isinstance(self.buffers, Mapping):
                raise ObservationError(f"'buffers' must be a dict of name -> tensor, got {type(self.buffers).__name__}")
            self.buffers = dict(self.buffers)
            for name, b in self.buffers.items():
                if not isinstance(name, str) or not isinstance(b, Tensor):
                    raise ObservationError(f"'buffers' entry {name!r} must map a string to a torch.Tensor")
                if b.layout != torch.strided or b.is_meta or b.is_quantized or b.is_complex() or b.dtype == torch.bool:
                    raise ObservationError(f"'buffers' entry '{name}' must be a dense real (float or integer) tensor")
                if torch.is_floating_point(b) and not bool(torch.isfinite(b).all()):
                    raise ObservationError(f"'buffers' entry '{name}' contains NaN/inf entries")

    def check_against(self, model: nn.Module, num_classes: Optional[int] = None) -> None:
        """Check that the gradients fit ``model.parameters()`` one to one (count and shapes)."""
        params = list(model.named_parameters())
        names = [n for n, _ in params]
        if len(params) != len(self.gradients):
            raise ObservationError(
                f"the observation has {len(self.gradients)} gradient tensors but the victim model "
                f"{type(model).__name__} has {len(params)} parameters; gradients must follow "
                "list(model.parameters()) order, one tensor per parameter"
            )
        if self.param_names is not None and self.param_names != names:
            if sorted(self.param_names) == sorted(names):
                moved = [n for n, m in zip(self.param_names, names) if n != m]
                raise ObservationError(
                    f"the observation's gradients are in a different order than the victim's parameters "
                    f"({', '.join(moved[:4])}{' ...' if len(moved) > 4 else ''} are out of place); "
                    "gradients must follow list(model.parameters()) order"
                )
            first = next((i for i, (a, b) in enumerate(zip(self.param_names, names)) if a != b), 0)
            raise ObservationError(
                f"param_names[{first}] is '{self.param_names[first]}' but the victim's parameter "
                f"{first} is '{names[first]}': was the gradient captured from another architecture?"
            )
        for i, ((pname, p), g) in enumerate(zip(params, self.gradients)):
            if tuple(g.shape) != tuple(p.shape):
                raise ObservationError(
                    f"{self._name(i)} has shape {tuple(g.shape)} but the victim's parameter '{pname}' "
                    f"has shape {tuple(p.shape)}"
                )
        if num_classes is not None and self.labels is not None and bool((self.labels >= num_classes).any()):
            raise ObservationError(
                f"'labels' {self.labels.tolist()} contain a class >= num_classes={num_classes}"
            )

    # ------------------------------------------------------------------ i/o
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format_version": FORMAT_VERSION if self.buffers is not None else 1,
            "gradients": [g.detach().cpu() for g in self.gradients],
            "batch_size": int(self.batch_size),
            "loss_reduction": self.loss_reduction,
            "metadata": dict(self.metadata),
        }
        if self.labels is not None:
            d["labels"] = self.labels.detach().cpu()
        if self.param_names is not None:
            d["param_names"] = list(self.param_names)
        if self.buffers is not None:
            d["buffers"] = {k: v.detach().cpu() for k, v in self.buffers.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GradientObservation":
        if not isinstance(d, Mapping):
            raise ObservationError(f"an observation file must hold a dict, found {type(d).__name__}")
        missing = [k for k in ("format_version", "gradients", "batch_size") if k not in d]
        if missing:
            raise ObservationError(
                f"observation is missing required key(s) {missing}; see docs/observation_format.md"
            )
        version = d["format_version"]
        if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
            raise ObservationError(
                f"unsupported observation format_version {version!r}; this lightning_gi reads {SUPPORTED_VERSIONS}"
            )
        unknown = sorted(set(map(str, d.keys())) - _KNOWN_KEYS)
        if unknown:
            raise ObservationError(f"unknown observation key(s) {unknown}; known keys: {sorted(_KNOWN_KEYS)}")
        newer = sorted(_VERSION_2_KEYS & set(map(str, d.keys())))
        if newer and version < 2:
            raise ObservationError(f"key(s) {newer} need format_version 2, the file says {version}")
        metadata = d.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise ObservationError(f"'metadata' must be a dict, got {type(metadata).__name__}")
        for key, value in metadata.items():
            if key in _LIST_METADATA and _is_number_list(value):  # the victim's per-channel normalisation
                continue
            if not isinstance(key, str) or not (value is None or isinstance(value, (str, int, float, bool))):
                raise ObservationError(
                    f"'metadata' entry {key!r} must map a string to a str/int/float/bool, got {type(value).__name__}"
                )
        return cls(
            gradients=d["gradients"],
            batch_size=d["batch_size"],
            labels=d.get("labels"),
            param_names=d.get("param_names"),
            loss_reduction=d.get("loss_reduction", "mean"),
            metadata=dict(metadata),
            buffers=d.get("buffers"),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename) so a crash never leaves a truncated observation."""
        save_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GradientObservation":
        """Load with ``weights_only=True``; any failure becomes an :class:`ObservationError`."""
        path = os.fspath(path)
        raw = read_torch_file(path, "observation file")
        try:
            return cls.from_dict(raw)
        except ObservationError as err:
            raise ObservationError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------- next to the observation
@dataclass
class GroundTruth:
    """The private batch (images in [0,1] image space, labels). Never shown to an attack."""

    images: Tensor
    labels: Tensor


@dataclass
class AttackInputs:
    """Everything an attack may use: what an honest-but-curious server has."""

    model: nn.Module
    observation: GradientObservation
    image_shape: tuple[int, int, int]
    mean: Tensor  # [C,1,1], the victim's input normalisation
    std: Tensor
    num_classes: int

    def to_image_space(self, x: Tensor) -> Tensor:
        """Undo the victim's normalisation: model input -> [0,1]-range image (not clamped)."""
        return x * self.std.to(x) + self.mean.to(x)

    def to_input_space(self, images: Tensor) -> Tensor:
        return (images - self.mean.to(images)) / self.std.to(images)


def read_torch_file(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure as one :class:`ObservationError` sentence.

    Distinguishes a missing, empty, compressed, text, truncated and otherwise unreadable file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ObservationError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise ObservationError(f"{what} {path} is not a regular file")
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        raise ObservationError(f"{what} {path} is empty (0 bytes): not a torch.save file")
    if head[:2] == b"\x1f\x8b":
        raise ObservationError(f"{what} {path} is gzip-compressed: decompress it first (it must be a torch.save file)")
    is_zip = head[:4] == b"PK\x03\x04"
    is_pickle = head[:1] == b"\x80"
    if not (is_zip or is_pickle):
        raise ObservationError(f"{what} {path} is not a torch.save file (it starts with {head[:8]!r})")
    try:
        with warnings.catch_warnings():  # torch warns about sparse tensors it is about to validate
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or holding objects outside the safe allow-list
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds objects other than tensors and plain containers (refused: loading could run code)"
        elif is_zip or isinstance(err, (EOFError, IndexError, RuntimeError)):
            reason = f"it is truncated or corrupt ({type(err).__name__}: {text[:120]})"
        else:
            reason = f"{type(err).__name__}: {text[:120]}"
        raise ObservationError(f"cannot read {what} {path}: {reason}") from None


def load_ground_truth(
    path: str | os.PathLike,
    image_shape: Sequence[int],
    batch_size: int,
    num_classes: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Read and check a ground-truth file ``{"images": [N,C,H,W] in [0,1], "labels": [N]}`` (labels optional).

    Everything is checked before the attack starts, so a bad file never fails after a long run.
    Returns ``(images float32, labels int64 or None)``.
    """
    path = os.fspath(path)
    raw = read_torch_file(path, "ground-truth file")
    if not isinstance(raw, Mapping):
        raise ObservationError(f"ground-truth file {path} must hold a dict with 'images' (and 'labels'), found {type(raw).__name__}")
    unknown = sorted(set(map(str, raw.keys())) - {"images", "labels", "metadata"})
    if unknown:
        raise ObservationError(f"ground-truth file {path} has unknown key(s) {unknown}; known keys: images, labels, metadata")
    images, labels = raw.get("images"), raw.get("labels")
    shape = tuple(int(s) for s in image_shape)
    expected = f"[{batch_size},{','.join(map(str, shape))}]"
    if not isinstance(images, Tensor) or images.layout != torch.strided or images.is_meta:
        raise ObservationError(f"ground-truth file {path}: 'images' must be a dense tensor of shape {expected}")
    if not torch.is_floating_point(images):
        raise ObservationError(f"ground-truth file {path}: 'images' has dtype {images.dtype}, expected floats in [0,1]")
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise ObservationError(
            f"ground-truth file {path}: 'images' has shape {tuple(images.shape)}, expected {expected} (the data's image_shape)"
        )
    if images.shape[0] != batch_size:
        raise ObservationError(
            f"ground-truth file {path}: {images.shape[0]} images but the observation's batch_size is {batch_size}"
        )
    if not bool(torch.isfinite(images).all()):
        raise ObservationError(f"ground-truth file {path}: 'images' contains NaN/inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ObservationError(
            f"ground-truth file {path}: 'images' range from {lo:.3g} to {hi:.3g}; ground truth must be "
            "un-normalised images in [0,1]"
        )
    if labels is None:
        return images.float(), None
    if (
        not isinstance(labels, Tensor) or labels.layout != torch.strided or labels.is_meta
        or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8)
    ):
        raise ObservationError(f"ground-truth file {path}: 'labels' must be an integer tensor of shape [{batch_size}]")
    labels = labels.long().reshape(-1)
    if labels.numel() != batch_size:
        raise ObservationError(
            f"ground-truth file {path}: {labels.numel()} labels for {batch_size} image(s); one label per image"
        )
    if bool((labels < 0).any()) or (num_classes is not None and bool((labels >= num_classes).any())):
        raise ObservationError(
            f"ground-truth file {path}: labels {labels.tolist()} outside [0, {num_classes if num_classes is not None else 'inf'})"
        )
    return images.float(), labels


GradientDefense = Callable[[list[Tensor]], list[Tensor]]

# The client's computation lives in lightning_gi/client.py (one simulation for the victim side and every
# attack); these names stay importable from here, where the observation format's users look for them.
from .client import capture_observation, client_gradients, forward_keeping_buffers  # noqa: E402,F401
