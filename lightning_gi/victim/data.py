"""Victim-side datasets and deterministic batch selection.

Every dataset returns ``(image, label)`` with ``image`` a float32 tensor ``[C, H, W]`` in ``[0, 1]``
(un-normalised: the victim model applies its own normalisation) and ``label`` an ``int``, and exposes
``targets``, ``num_classes`` and ``classes`` so batches can be drawn by label without decoding images.

Two datasets ship inside installed wheels so experiments and tests run fully offline:
``BundledDigits`` (scikit-learn's 8x8 digits) and ``BundledPhotographs`` (real photographs bundled with
scikit-learn and scikit-image). The torchvision datasets are never downloaded: missing files raise
``DatasetNotFoundError`` explaining where to put them.

Private and public pools. The bundled images are split into two disjoint pools, chosen with
``pool="private"`` (the default) or ``pool="public"``:

- PRIVATE: the images a victim's batch is cut from (what attacks reconstruct): the 14 photographs of
  ``_PRIVATE_PHOTO_SOURCES`` and the digits whose index is not 4 mod 5.
- PUBLIC: what an attacker may hold (auxiliary feature statistics, BN calibration, generator training):
  other scikit-image pictures (``_PUBLIC_PHOTO_SOURCES``: textures, microscopy, astronomy) and the digits
  with index 4 mod 5 that are not pixel-identical to a private digit.

Disjointness is checked by source image identity, not by name or crop index: a source whose pixels, or
whose 32x32 grey thumbnail, match a private one (e.g. ``skimage.data.cat`` is ``chelsea``) is refused
(:func:`check_pools_disjoint`). :func:`public_images` is the only way the auxiliary-statistics and
calibration code read images, and it reads the public pool only.
"""

import math
import os
import zlib
from functools import lru_cache
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DATASET_NAMES",
    "LABEL_MODES",
    "LabelMode",
    "POOLS",
    "Pool",
    "check_pools_disjoint",
    "public_images",
    "public_photograph_count",
    "BundledDigits",
    "BundledPhotographs",
    "DatasetNotFoundError",
    "TorchvisionDataset",
    "build_dataset",
    "image_folder",
    "is_bundled",
    "load_photographs",
    "select_batch",
    "torchvision_dataset",
]

DATASET_NAMES = ("digits", "photographs", "mnist", "fashionmnist", "svhn", "cifar10", "cifar100", "imagefolder")
LABEL_MODES = ("unique", "repeated", "random")
LabelMode = Literal["unique", "repeated", "random"]
Pool = Literal["private", "public"]
POOLS = ("private", "public")


def dataset_key(name: str) -> str:
    """The canonical form of a dataset name (case, ``-`` and ``_`` ignored): ``"CIFAR-10"`` -> ``"cifar10"``."""
    return str(name).lower().replace("-", "").replace("_", "")


def is_bundled(dataset: str) -> bool:
    """The offline datasets shipped with the package ("photographs", "digits")."""
    return dataset_key(dataset) in ("photographs", "digits")


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are not on disk (nothing is ever downloaded)."""


# ----------------------------------------------------------------------------------------------- helpers
def _check_size_channels(image_size: Optional[int], channels: Optional[int]) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def _to_channels(x: Tensor, channels: Optional[int]) -> Tensor:
    """Convert ``[..., C, H, W]`` to ``channels`` (grey repeated to RGB, RGB to ITU-R 601 luma)."""
    if x.shape[-3] == 4:  # RGBA: drop alpha
        x = x[..., :3, :, :]
    c = x.shape[-3]
    if channels is None or c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * w).sum(dim=-3, keepdim=True)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with antialiasing (so downscaled photographs do not alias) of ``[C,H,W]`` or ``[N,C,H,W]``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    batched = x.dim() == 4
    y = F.interpolate(x if batched else x[None], size=size, mode="bilinear", antialias=True, align_corners=False)
    return (y if batched else y[0]).clamp_(0.0, 1.0)


def _resize_center_crop(x: Tensor, size: int) -> Tensor:
    """Scale the shorter side to ``size`` then take the central ``size x size`` square."""
    h, w = x.shape[-2:]
    if h == w == size:
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = _resize(x, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].contiguous()


class _TensorImageDataset(Dataset):
    """Images pre-computed into one tensor: tiny bundled datasets fit in memory and index instantly."""

    def __init__(self, images: Tensor, targets: list[int], classes: list[str]) -> None:
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        # clone so callers normalising in place cannot corrupt the dataset
        return self.images[index].clone(), self.targets[index]


# ----------------------------------------------------------------------------------------------- bundled
_DIGITS_PUBLIC_EVERY = 5  # digit i is public when i % 5 == 4, private otherwise


@lru_cache(maxsize=2)
def _digit_pool_indices(pool: str) -> tuple[int, ...]:
    """Indices into scikit-learn's digits of one pool; public digits equal to a private one are dropped."""
    from sklearn.datasets import load_digits

    raw = np.asarray(load_digits().images)
    n = raw.shape[0]
    private = [i for i in range(n) if i % _DIGITS_PUBLIC_EVERY != _DIGITS_PUBLIC_EVERY - 1]
    if pool == "private":
        return tuple(private)
    seen = {raw[i].tobytes() for i in private}
    return tuple(i for i in range(n) if i % _DIGITS_PUBLIC_EVERY == _DIGITS_PUBLIC_EVERY - 1 and raw[i].tobytes() not in seen)


class BundledDigits(_TensorImageDataset):
    """scikit-learn's handwritten 8x8 digits (values 0..16), scaled to [0, 1] and resized; 10 classes.

    ``pool="private"`` holds the 1438 digits with index not 4 mod 5, ``pool="public"`` the others (minus any
    pixel-identical to a private digit); ``source_indices[i]`` is item i's index in ``load_digits()``.
    """

    def __init__(self, image_size: int = 16, channels: int = 1, pool: Pool = "private") -> None:
        _check_size_channels(image_size, channels)
        _check_pool(pool)
        from sklearn.datasets import load_digits

        bunch = load_digits()
        keep = list(_digit_pool_indices(pool))
        x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)[keep] / 16.0)[:, None]
        x = _to_channels(_resize(x, (image_size, image_size)), channels)
        super().__init__(x.contiguous(), bunch.target[keep].tolist(), [str(i) for i in range(10)])
        self.pool = pool
        self.source_indices: list[int] = keep


def _sklearn_sample(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


def _skimage(name: str, index: Optional[int] = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        out = getattr(skimage.data, name)()
        return out[index] if index is not None else out

    return load


# PRIVATE pool: real photographs with enough contrast to be meaningful at 16-64 px (no synthetic patterns,
# logos, masks, low-contrast textures or near-black astronomy); fixed order = class order.
_PRIVATE_PHOTO_SOURCES: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    ("china", _sklearn_sample("china")),
    ("flower", _sklearn_sample("flower")),
    ("astronaut", _skimage("astronaut")),
    ("chelsea", _skimage("chelsea")),
    ("coffee", _skimage("coffee")),
    ("rocket", _skimage("rocket")),
    ("immunohistochemistry", _skimage("immunohistochemistry")),
    ("retina", _skimage("retina")),
    ("motorcycle", _skimage("stereo_motorcycle", 0)),
    ("camera", _skimage("camera")),
    ("coins", _skimage("coins")),
    ("page", _skimage("page")),
    ("text", _skimage("text")),
    ("clock", _skimage("clock")),
)
# PUBLIC pool: other pictures shipped with scikit-image, none of them a private source or the same scene
# (not ``cat``, which is ``chelsea``, nor the right view of ``stereo_motorcycle``).
_PUBLIC_PHOTO_SOURCES: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    ("hubble_deep_field", _skimage("hubble_deep_field")),
    ("colorwheel", _skimage("colorwheel")),
    ("brick", _skimage("brick")),
    ("grass", _skimage("grass")),
    ("gravel", _skimage("gravel")),
    ("cell", _skimage("cell")),
    ("moon", _skimage("moon")),
    ("microaneurysms", _skimage("microaneurysms")),
)
_PHOTO_SOURCES = _PRIVATE_PHOTO_SOURCES  # backwards-compatible name: the attacked photographs
MIN_PHOTOGRAPHS = 8
MIN_PUBLIC_PHOTOGRAPHS = 4


def _as_uint8_chw(a: np.ndarray) -> Tensor:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(np.asarray(a, dtype=np.float64) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round()
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"unexpected photograph shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a[:, :, :3].transpose(2, 0, 1)))


@lru_cache(maxsize=2)
def _decoded_photographs(pool: str = "private") -> tuple[tuple[str, Tensor], ...]:
    """Decode once per process: several datasets (sizes, seeds, channels) share the same photographs."""
    _check_pool(pool)
    sources = _PRIVATE_PHOTO_SOURCES if pool == "private" else _PUBLIC_PHOTO_SOURCES
    needed = MIN_PHOTOGRAPHS if pool == "private" else MIN_PUBLIC_PHOTOGRAPHS
    found = []
    for name, load in sources:
        try:
            found.append((name, _as_uint8_chw(load())))
        except Exception:  # noqa: BLE001 - a photograph missing from this install is simply skipped
            continue
    if len(found) < needed:
        raise RuntimeError(
            f"only {len(found)} bundled {pool} photographs could be loaded offline ({[n for n, _ in found]}); "
            f"at least {needed} are needed - check the scikit-learn / scikit-image installation"
        )
    if pool == "public":
        check_pools_disjoint(_decoded_photographs("private"), tuple(found))
    return tuple(found)


def _thumbnail(photo: Tensor) -> Tensor:
    """A 32x32 standardised grey thumbnail: the same picture at another size or in grey matches it."""
    x = _to_channels(photo.float()[None] / 255.0, 1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).flatten()
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def check_pools_disjoint(private: tuple[tuple[str, Tensor], ...], public: tuple[tuple[str, Tensor], ...]) -> None:
    """Raise if a public source is a private one: same name, identical pixels, or the same picture (grey
    32x32 thumbnails correlated above 0.95)."""
    private_names = {n for n, _ in private}
    private_bytes = {(tuple(p.shape), p.numpy().tobytes()) for _, p in private}
    thumbs = [(n, _thumbnail(p)) for n, p in private]
    for name, photo in public:
        if name in private_names or (tuple(photo.shape), photo.numpy().tobytes()) in private_bytes:
            raise RuntimeError(f"public photograph {name!r} is also a private one: the pools must be disjoint")
        t = _thumbnail(photo)
        for pname, pt in thumbs:
            if float((t * pt).mean()) > 0.95:
                raise RuntimeError(f"public photograph {name!r} is the same picture as private {pname!r}")


def load_photographs(pool: Pool = "private") -> dict[str, Tensor]:
    """The bundled photographs of ``pool`` available offline, name -> uint8 ``[C, H, W]`` (shared cache: do not modify)."""
    return dict(_decoded_photographs(pool))


class BundledPhotographs(_TensorImageDataset):
    """Real photographs from installed wheels; each photograph is one class, cut into square crops.

    Crop 0 of each photograph is its largest central square; the others are random squares with side in
    [50%, 100%] of the shorter side, drawn from a generator seeded by ``seed`` and the photograph's name
    (so crops do not shift if another photograph is unavailable). ``crop_boxes[i]`` is ``(top, left, side)``.
    ``pool`` chooses the PRIVATE photographs (attacked; default) or the disjoint PUBLIC ones (module docs).
    """

    def __init__(
        self, image_size: int = 32, channels: int = 3, crops_per_photo: int = 8, seed: int = 0, pool: Pool = "private"
    ) -> None:
        _check_size_channels(image_size, channels)
        _check_pool(pool)
        if not isinstance(crops_per_photo, int) or crops_per_photo < 1:
            raise ValueError(f"crops_per_photo must be a positive int, got {crops_per_photo!r}")
        images, targets, boxes, classes = [], [], [], []
        for label, (name, photo) in enumerate(_decoded_photographs(pool)):
            classes.append(name)
            h, w = photo.shape[-2:]
            short = min(h, w)
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            x = photo.float().div_(255.0)
            for k in range(crops_per_photo):
                if k == 0:
                    side, top, left = short, (h - short) // 2, (w - short) // 2
                else:
                    side = max(1, round(short * (0.5 + 0.5 * torch.rand((), generator=gen).item())))
                    top = int(torch.randint(0, h - side + 1, (), generator=gen))
                    left = int(torch.randint(0, w - side + 1, (), generator=gen))
                crop = _resize(x[:, top : top + side, left : left + side], (image_size, image_size))
                images.append(_to_channels(crop, channels))
                targets.append(label)
                boxes.append((top, left, side))
        super().__init__(torch.stack(images).contiguous(), targets, classes)
        self.crop_boxes: list[tuple[int, int, int]] = boxes
        self.pool = pool


def public_photograph_count() -> int:
    """How many PUBLIC photographs this install provides."""
    return len(_decoded_photographs("public"))


def public_images(image_size: int, count: int, seed: int = 1, channels: int = 3) -> Tensor:
    """``[count, channels, s, s]`` random crops in [0, 1] of the PUBLIC photographs only (module docs).

    What the attacker's side (auxiliary statistics, BN calibration) may read: it has no way to ask for the
    private pool. Crops cycle over the public photographs; which crops is fixed by ``seed``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    per_photo = -(-count // public_photograph_count())
    ds = BundledPhotographs(image_size=image_size, channels=channels, crops_per_photo=per_photo, seed=seed, pool="public")
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(ds), generator=gen)[:count]
    return ds.images[order].clone()


# ----------------------------------------------------------------------------------------------- on disk
_TORCHVISION: dict[str, tuple[str, str]] = {
    # name -> (torchvision class, expected layout under root)
    "mnist": ("MNIST", "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (the four uncompressed files)"),
    "fashionmnist": (
        "FashionMNIST",
        "<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (the four uncompressed files)",
    ),
    "svhn": ("SVHN", "<root>/train_32x32.mat and <root>/test_32x32.mat"),
    "cifar10": ("CIFAR10", "<root>/cifar-10-batches-py/ (extracted cifar-10-python.tar.gz)"),
    "cifar100": ("CIFAR100", "<root>/cifar-100-python/ (extracted cifar-100-python.tar.gz)"),
    "imagefolder": ("ImageFolder", "<root>/<class_name>/<image>.{png,jpg,...} (one sub-folder per class)"),
}


def _not_found(name: str, root: Optional[str], reason: str = "") -> DatasetNotFoundError:
    layout = _TORCHVISION[name][1]
    where = f"root {os.path.abspath(root)!r}" if root else "root=None"
    msg = (
        f"dataset '{name}' not found at {where}{': ' + reason if reason else ''}. "
        f"Nothing is downloaded; place the files yourself, expected layout: {layout}"
    )
    return DatasetNotFoundError(msg)


class TorchvisionDataset(Dataset):
    """Wraps a torchvision dataset (PIL images) into the ``(float [C,H,W] in [0,1], int)`` contract."""

    def __init__(
        self,
        base: Any,
        image_size: Optional[int] = None,
        channels: Optional[int] = None,
        classes: Optional[list[str]] = None,
    ) -> None:
        _check_size_channels(image_size, channels)
        self.base = base
        self.image_size = image_size
        self.channels = channels
        targets = getattr(base, "targets", None)
        if targets is None:
            targets = getattr(base, "labels")  # SVHN
        self.targets = [int(t) for t in (targets.tolist() if hasattr(targets, "tolist") else targets)]
        self.classes = list(classes if classes is not None else base.classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from torchvision.transforms.functional import pil_to_tensor

        img, label = self.base[index]
        x = img if isinstance(img, Tensor) else pil_to_tensor(img)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.image_size is not None:
            x = _resize_center_crop(x, self.image_size)
        return _to_channels(x, self.channels).contiguous(), int(label)


def torchvision_dataset(
    name: str,
    root: str,
    train: bool = True,
    image_size: Optional[int] = None,
    channels: Optional[int] = None,
) -> TorchvisionDataset:
    """MNIST / FashionMNIST / SVHN / CIFAR-10 / CIFAR-100 from local files (``download=False`` always)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _TORCHVISION or key == "imagefolder":
        valid = [k for k in _TORCHVISION if k != "imagefolder"]
        raise ValueError(f"unknown torchvision dataset {name!r}; valid: {valid}")
    _check_size_channels(image_size, channels)
    if not root or not os.path.isdir(root):
        raise _not_found(key, root, "directory does not exist")
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION[key][0])
    try:
        if key == "svhn":
            base = cls(root, split="train" if train else "test", download=False)
        else:
            base = cls(root, train=train, download=False)
    except (RuntimeError, OSError, ValueError) as e:  # torchvision reports missing/corrupt files as RuntimeError
        raise _not_found(key, root, "files missing, incomplete or corrupt") from e
    classes = [str(i) for i in range(10)] if key == "svhn" else None
    return TorchvisionDataset(base, image_size=image_size, channels=channels, classes=classes)


def image_folder(root: str, image_size: int, channels: int = 3) -> TorchvisionDataset:
    """torchvision ``ImageFolder`` (one sub-folder per class), resized on the shorter side and centre-cropped."""
    _check_size_channels(image_size, channels)
    if image_size is None:
        raise ValueError("image_size is required for image folders (images may have any size)")
    if not root or not os.path.isdir(root):
        raise _not_found("imagefolder", root, "directory does not exist")
    from torchvision.datasets import ImageFolder

    try:
        base = ImageFolder(root)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no valid images
        raise _not_found("imagefolder", root, f"{type(e).__name__}: {e}") from e
    return TorchvisionDataset(base, image_size=image_size, channels=channels)


def build_dataset(
    name: str,
    root: Optional[str] = None,
    image_size: int = 32,
    channels: int = 3,
    train: bool = True,
    crops_per_photo: int = 8,
    seed: int = 0,
    pool: Pool = "private",
) -> Dataset:
    """Dataset by (case-insensitive) name; ``root`` is only needed for on-disk datasets.

    ``pool`` (bundled datasets only) picks the private (attacked) or public images (module docs).
    """
    _check_pool(pool)
    key = dataset_key(name)
    if key == "digits":
        return BundledDigits(image_size=image_size, channels=channels, pool=pool)
    if key == "photographs":
        return BundledPhotographs(image_size=image_size, channels=channels, crops_per_photo=crops_per_photo, seed=seed, pool=pool)
    if pool != "private":
        raise ValueError(f"pool={pool!r} applies to the bundled datasets only; for '{name}' use its own splits")
    if key == "imagefolder":
        return image_folder(root, image_size=image_size, channels=channels)
    if key in _TORCHVISION:
        return torchvision_dataset(key, root, train=train, image_size=image_size, channels=channels)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


# ----------------------------------------------------------------------------------------------- batches
def _targets(dataset: Dataset) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:  # generic dataset (e.g. Subset): read labels item by item
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor([int(t) for t in targets], dtype=torch.long)


def _randint(high: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, high, (), generator=gen))


def select_batch(
    dataset: Dataset,
    batch_size: int,
    seed: int = 0,
    label_mode: str = "unique",
    num_distinct: Optional[int] = None,
    num_classes: Optional[int] = None,
) -> tuple[Tensor, Tensor, list[int]]:
    """Deterministically pick the victim's private batch; returns ``(images, labels, dataset indices)``.

    ``label_mode`` controls the label structure, which matters for label-recovery attacks:
    ``"unique"`` - all labels distinct; ``"repeated"`` - exactly ``num_distinct`` classes (default
    ``ceil(N/2)``), each at least once; ``"random"`` - uniformly random distinct indices.

    ``num_classes`` (a victim with fewer outputs than the dataset has classes): only items with label
    ``< num_classes`` are drawn, i.e. the dataset's first ``num_classes`` classes, labels unchanged. The
    seeded draw runs over all of the dataset's classes (items) and skips the others, so a seed whose batch
    already fits gives the same batch as without ``num_classes``.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if num_distinct is not None and label_mode != "repeated":
        raise ValueError(f"num_distinct is only used with label_mode='repeated' (got label_mode={label_mode!r})")
    n_items = len(dataset)
    if n_items == 0:
        raise ValueError("dataset is empty")
    gen = torch.Generator().manual_seed(int(seed))

    fewer = "" if num_classes is None else f" with label < num_classes={num_classes}"
    if label_mode == "random":
        order = torch.randperm(n_items, generator=gen)
        if num_classes is not None:
            targets = _targets(dataset)
            order = order[targets[order] < num_classes]
        if batch_size > len(order):
            raise ValueError(f"batch_size={batch_size} exceeds the {len(order)} items of the dataset{fewer}")
        indices = order[:batch_size].tolist()
    else:
        targets = _targets(dataset)
        present = torch.unique(targets)
        usable = len(present) if num_classes is None else int((present < num_classes).sum())
        if usable == 0:
            raise ValueError(f"the dataset has no item{fewer}")
        by_class = {int(c): (targets == c).nonzero().flatten() for c in present}

        def draw(k: int) -> list[int]:
            """k classes in a seeded order over all present classes, skipping those >= num_classes."""
            perm = [int(present[i]) for i in torch.randperm(len(present), generator=gen)]
            return [c for c in perm if num_classes is None or c < num_classes][:k]

        if label_mode == "unique":
            if batch_size > usable:
                raise ValueError(
                    f"label_mode='unique' needs batch_size <= number of classes present{fewer} ({usable}), "
                    f"got {batch_size}; use label_mode='repeated' or 'random'"
                )
            counts = {c: 1 for c in draw(batch_size)}
        else:
            if num_distinct is None:
                k = min(max(1, math.ceil(batch_size / 2)), usable, batch_size)
            else:
                if not isinstance(num_distinct, int) or not 1 <= num_distinct <= min(batch_size, usable):
                    raise ValueError(
                        f"num_distinct must be an int in [1, min(batch_size={batch_size}, "
                        f"classes present{fewer}={usable})], got {num_distinct!r}"
                    )
                k = num_distinct
            chosen = draw(k)
            counts = {c: 1 for c in chosen}
            for j in torch.randint(0, k, (batch_size - k,), generator=gen).tolist():
                counts[chosen[j]] += 1
        indices = []
        for c, m in counts.items():
            pool = by_class[c]
            take = pool[torch.randperm(len(pool), generator=gen)[:m]].tolist()
            # more repeats than samples of that class: reuse indices (unavoidable)
            take += [int(pool[_randint(len(pool), gen)]) for _ in range(m - len(take))]
            indices.extend(take)
        indices = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]

    items = [dataset[i] for i in indices]
    images = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)
    return images, labels, [int(i) for i in indices]
