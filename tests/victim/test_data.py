"""Victim datasets: bundled offline data, torchvision/ImageFolder wrappers on tiny local fakes, batch selection."""

import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_gi.victim.data import (
    DATASET_NAMES,
    POOLS,
    BundledDigits,
    BundledPhotographs,
    DatasetNotFoundError,
    TorchvisionDataset,
    build_dataset,
    load_photographs,
    public_images,
    select_batch,
    torchvision_dataset,
)


def _check_item(x, y, shape):
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert tuple(x.shape) == shape
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert isinstance(y, int)


@pytest.fixture(scope="module")
def photos():
    return BundledPhotographs(image_size=32, channels=3, crops_per_photo=4, seed=0)


# ------------------------------------------------------------------------------------------------ digits
def test_digits_shapes_range_and_channels():
    ds = BundledDigits(image_size=16, channels=1)
    assert len(ds) == 1438 and ds.num_classes == 10 and ds.classes == [str(i) for i in range(10)]  # private pool
    assert len(ds.targets) == len(ds) and set(ds.targets) == set(range(10))
    x, y = ds[5]
    _check_item(x, y, (1, 16, 16))
    assert y == ds.targets[5]
    assert float(ds.images.max()) > 0.9 and float(ds.images.min()) == 0.0  # scaled from 0..16, not 0..255
    rgb = BundledDigits(image_size=8, channels=3)
    x3, _ = rgb[5]
    _check_item(x3, y, (3, 8, 8))
    assert torch.equal(x3[0], x3[1]) and torch.equal(x3[1], x3[2])
    from sklearn.datasets import load_digits

    src = rgb.source_indices[5]
    assert torch.allclose(x3[0], torch.from_numpy(load_digits().images[src]).float() / 16, atol=1e-6)  # 8 -> 8: exact


def test_digits_getitem_returns_copy():
    ds = BundledDigits()
    x, _ = ds[0]
    x.zero_()
    assert float(ds[0][0].sum()) > 0


# ------------------------------------------------------------------------------------------- photographs
def test_photographs_classes_shapes_and_contrast(photos):
    assert photos.num_classes >= 8 and len(photos.classes) == photos.num_classes
    assert len(set(photos.classes)) == photos.num_classes
    assert {"china", "flower"} <= set(photos.classes)
    assert len(photos) == 4 * photos.num_classes
    assert photos.targets == [c for c in range(photos.num_classes) for _ in range(4)]
    for i in (0, 1, len(photos) - 1):
        _check_item(*photos[i], (3, 32, 32))
    std = photos.images.flatten(1).std(dim=1)
    assert float(std[::4].min()) > 0.05  # every central crop is a real, non-constant picture
    assert float(std.min()) > 0.02


def test_photographs_first_crop_is_central_square(photos):
    originals = load_photographs()
    assert list(originals) == photos.classes
    for label in (0, photos.num_classes - 1):
        photo = originals[photos.classes[label]].float() / 255
        h, w = photo.shape[-2:]
        s = min(h, w)
        assert photos.crop_boxes[4 * label] == ((h - s) // 2, (w - s) // 2, s)
        centre = photo[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        expected = F.interpolate(centre[None], size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
        if expected.shape[0] == 1:
            expected = expected.expand(3, -1, -1)
        assert torch.allclose(photos[4 * label][0], expected.clamp(0, 1), atol=1e-5)
        for top, left, side in photos.crop_boxes[4 * label + 1 : 4 * label + 4]:
            assert s // 2 <= side <= s and 0 <= top <= h - side and 0 <= left <= w - side


def test_photographs_deterministic_by_seed(photos):
    again = BundledPhotographs(image_size=32, channels=3, crops_per_photo=4, seed=0)
    assert torch.equal(again.images, photos.images) and again.crop_boxes == photos.crop_boxes
    other = BundledPhotographs(image_size=32, channels=3, crops_per_photo=4, seed=1)
    assert torch.equal(other.images[::4], photos.images[::4])  # central crops do not depend on the seed
    assert other.crop_boxes != photos.crop_boxes
    assert not torch.equal(other.images, photos.images)


def test_photographs_grey_conversion_and_cache(photos):
    grey = BundledPhotographs(image_size=32, channels=1, crops_per_photo=4, seed=0)
    assert tuple(grey.images.shape) == (len(photos), 1, 32, 32)
    luma = (photos.images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(grey.images, luma, atol=1e-5)
    originals = load_photographs()
    grey_names = [n for n, p in originals.items() if p.shape[0] == 1]
    assert grey_names, "expected at least one greyscale photograph (e.g. camera)"
    x = photos[4 * photos.classes.index(grey_names[0])][0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    colour = photos[4 * photos.classes.index("china")][0]
    assert not torch.equal(colour[0], colour[1])
    assert load_photographs()["china"] is originals["china"]  # decoded once per process


def test_photographs_validation():
    with pytest.raises(ValueError):
        BundledPhotographs(channels=2)
    with pytest.raises(ValueError):
        BundledPhotographs(crops_per_photo=0)
    with pytest.raises(ValueError):
        BundledDigits(image_size=0)


# ---------------------------------------------------------------------------------------- select_batch
def test_select_batch_unique(photos):
    images, labels, idx = select_batch(photos, 6, seed=3)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long and labels.shape == (6,)
    assert len(set(labels.tolist())) == 6
    assert len(idx) == 6 and all(isinstance(i, int) for i in idx)
    assert labels.tolist() == [photos.targets[i] for i in idx]
    assert torch.equal(images[2], photos[idx[2]][0])
    same = select_batch(photos, 6, seed=3)
    assert torch.equal(same[0], images) and same[2] == idx
    assert select_batch(photos, 6, seed=4)[2] != idx
    _, full, _ = select_batch(photos, photos.num_classes, seed=0)
    assert sorted(full.tolist()) == list(range(photos.num_classes))
    with pytest.raises(ValueError, match="classes"):
        select_batch(photos, photos.num_classes + 1, label_mode="unique")


def test_select_batch_repeated():
    ds = BundledDigits(image_size=8)
    for seed in range(5):
        _, labels, idx = select_batch(ds, 8, seed=seed, label_mode="repeated", num_distinct=3)
        counts = torch.bincount(labels, minlength=10)
        assert int((counts > 0).sum()) == 3 and int(counts.max()) >= 2
        assert len(set(idx)) == 8  # repeated labels, but never the same image twice
    _, labels, _ = select_batch(ds, 7, seed=0, label_mode="repeated")
    assert len(set(labels.tolist())) == math.ceil(7 / 2)
    _, labels, _ = select_batch(ds, 1, seed=0, label_mode="repeated")
    assert labels.shape == (1,)
    a = select_batch(ds, 8, seed=1, label_mode="repeated", num_distinct=3)
    b = select_batch(ds, 8, seed=1, label_mode="repeated", num_distinct=3)
    c = select_batch(ds, 8, seed=2, label_mode="repeated", num_distinct=3)
    assert a[2] == b[2] and torch.equal(a[0], b[0]) and a[2] != c[2]
    with pytest.raises(ValueError):
        select_batch(ds, 4, label_mode="repeated", num_distinct=5)  # more classes than images
    with pytest.raises(ValueError):
        select_batch(ds, 40, label_mode="repeated", num_distinct=11)  # more classes than exist


def test_select_batch_random_and_validation(photos):
    _, _, idx = select_batch(photos, 10, seed=0, label_mode="random")
    assert len(set(idx)) == 10
    assert select_batch(photos, 10, seed=1, label_mode="random")[2] != idx
    with pytest.raises(ValueError):
        select_batch(photos, len(photos) + 1, label_mode="random")
    with pytest.raises(ValueError):
        select_batch(photos, 0)
    with pytest.raises(ValueError, match="label_mode"):
        select_batch(photos, 2, label_mode="sorted")
    with pytest.raises(ValueError):
        select_batch(photos, 2, label_mode="unique", num_distinct=2)


# -------------------------------------------------------------------------------------- build_dataset
def test_build_dataset_names():
    assert isinstance(build_dataset("Digits", image_size=8, channels=1), BundledDigits)
    ds = build_dataset("PHOTOGRAPHS", image_size=16, channels=1, crops_per_photo=2, seed=5)
    assert isinstance(ds, BundledPhotographs) and ds[0][0].shape == (1, 16, 16) and len(ds) == 2 * ds.num_classes
    with pytest.raises(ValueError) as err:
        build_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASET_NAMES)


def _write_idx_mnist(raw, rng, n_train=12, n_test=5):
    raw.mkdir(parents=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())
        data[split] = (images, labels)
    return data


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("FashionMNIST", "FashionMNIST")])
def test_mnist_from_local_idx_files(tmp_path, name, folder):
    data = _write_idx_mnist(tmp_path / folder / "raw", np.random.default_rng(0))
    native = torchvision_dataset(name, str(tmp_path))
    assert len(native) == 12 and native.num_classes == 10 and len(native.classes) == 10
    assert native.targets == data["train"][1].tolist()
    x, y = native[3]
    _check_item(x, y, (1, 28, 28))
    assert torch.allclose(x[0], torch.from_numpy(data["train"][0][3]).float() / 255) and y == 3
    ds = build_dataset(name, root=str(tmp_path), image_size=32, channels=3)
    assert isinstance(ds, TorchvisionDataset) and len(ds) == 12
    x, y = ds[3]
    _check_item(x, y, (3, 32, 32))
    assert torch.equal(x[0], x[2])
    test = build_dataset(name, root=str(tmp_path), image_size=28, channels=1, train=False)
    assert len(test) == 5 and torch.allclose(test[1][0][0], torch.from_numpy(data["t10k"][0][1]).float() / 255)
    images, labels, _ = select_batch(ds, 4, seed=0)
    assert images.shape == (4, 3, 32, 32) and len(set(labels.tolist())) == 4


def test_image_folder(tmp_path):
    # 24 x 72 images: red | green | blue thirds, so the resized centre crop must be pure green
    for cls, n in (("cat", 3), ("dog", 2)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            a = np.zeros((24, 72, 3), dtype=np.uint8)
            a[:, :24, 0] = a[:, 24:48, 1] = a[:, 48:, 2] = 255
            Image.fromarray(a).save(tmp_path / cls / f"{i}.png")
    ds = build_dataset("ImageFolder", root=str(tmp_path), image_size=16, channels=3)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and ds.targets == [0, 0, 0, 1, 1]
    x, y = ds[4]
    _check_item(x, y, (3, 16, 16))
    assert y == 1
    inner = x[:, :, 2:-2]
    assert float(inner[1].min()) > 0.99 and float(inner[0].max()) < 0.01 and float(inner[2].max()) < 0.01
    grey = build_dataset("imagefolder", root=str(tmp_path), image_size=8, channels=1)
    _check_item(*grey[0], (1, 8, 8))
    assert torch.allclose(grey[0][0][:, :, 2:-2], torch.tensor(0.587), atol=1e-2)


def test_wrapper_uses_svhn_style_labels():
    class FakeSVHN:  # torchvision's SVHN exposes `.labels` and no `.classes`
        labels = np.array([3, 1, 0])

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)), int(self.labels[i])

    ds = TorchvisionDataset(FakeSVHN(), image_size=16, channels=1, classes=[str(i) for i in range(10)])
    assert ds.targets == [3, 1, 0] and ds.num_classes == 10
    x, y = ds[2]
    _check_item(x, y, (1, 16, 16))
    assert y == 0 and torch.allclose(x, torch.full_like(x, 80 / 255), atol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "fashionmnist", "svhn", "cifar10", "cifar100", "imagefolder"])
def test_missing_root_raises(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, root=str(missing))
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert str(missing) in msg and name in msg.lower() and "download" in msg.lower()
    with pytest.raises(DatasetNotFoundError):
        build_dataset(name, root=None)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagefolder"])
def test_incomplete_root_raises(tmp_path, name):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)  # folder layout present, files absent
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, root=str(tmp_path))
    assert str(tmp_path) in str(err.value)


# ------------------------------------------------------------------------------- private / public pools
def _crop_set(images: torch.Tensor) -> set[bytes]:
    return {x.contiguous().numpy().tobytes() for x in images}


def test_pools_share_no_source_image():
    private, public = load_photographs("private"), load_photographs("public")
    assert len(private) >= 8 and len(public) >= 4 and POOLS == ("private", "public")
    assert not set(private) & set(public)
    private_pixels = {(tuple(p.shape), p.numpy().tobytes()) for p in private.values()}
    assert not any((tuple(p.shape), p.numpy().tobytes()) in private_pixels for p in public.values())
    # the same picture at another size or in grey is the same source too
    def thumb(p):
        x = F.interpolate(p.float().mean(0, keepdim=True)[None], size=(32, 32), mode="bilinear", antialias=True)
        x = x.flatten()
        return (x - x.mean()) / x.std()

    for a in private.values():
        for b in public.values():
            assert float((thumb(a) * thumb(b)).mean()) < 0.9
    digits_private, digits_public = BundledDigits(image_size=8, pool="private"), BundledDigits(image_size=8, pool="public")
    assert len(digits_public) > 300 and not set(digits_private.source_indices) & set(digits_public.source_indices)
    assert not _crop_set(digits_private.images) & _crop_set(digits_public.images)


def test_pools_share_no_pixel_identical_crop():
    for seed in (0, 1):
        private = BundledPhotographs(image_size=16, crops_per_photo=6, seed=seed, pool="private")
        public = BundledPhotographs(image_size=16, crops_per_photo=6, seed=seed, pool="public")
        assert not _crop_set(private.images) & _crop_set(public.images)
        assert not set(private.classes) & set(public.classes)
    with pytest.raises(ValueError, match="pool"):
        BundledPhotographs(pool="attacker")
    with pytest.raises(ValueError, match="pool"):
        build_dataset("photographs", pool="both")


def test_private_pool_is_the_default_everywhere():
    default = build_dataset("photographs", image_size=16, channels=3, crops_per_photo=2)
    private = BundledPhotographs(image_size=16, crops_per_photo=2, pool="private")
    assert torch.equal(default.images, private.images) and default.classes == list(load_photographs())


def test_public_images_are_public_crops_only():
    images = public_images(16, 20, seed=3)
    assert images.shape == (20, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1
    per_photo = -(-20 // len(load_photographs("public")))
    public = _crop_set(BundledPhotographs(image_size=16, crops_per_photo=per_photo, seed=3, pool="public").images)
    assert _crop_set(images) <= public
    private = _crop_set(BundledPhotographs(image_size=16, crops_per_photo=per_photo, seed=3).images)
    assert not _crop_set(images) & private


def test_auxiliary_statistics_and_calibration_read_the_public_pool_only():
    from lightning_gi.labels.auxiliary_stats import AUX_SOURCES, auxiliary_images
    from lightning_gi.victim.calibration import bn_calibrated_classifier, calibrate_batchnorm, calibration_images
    from lightning_gi.victim.models import reinitialise, torchvision_classifier

    n_public = len(load_photographs("public"))
    for source in AUX_SOURCES:
        aux = auxiliary_images(source, image_size=16, count=10, seed=1)
        per_photo = -(-10 // n_public)
        allowed = _crop_set(BundledPhotographs(image_size=16, crops_per_photo=per_photo, seed=1, pool="public").images)
        assert _crop_set(aux) <= allowed, f"aux source {source!r} reads outside the public pool"
        private = _crop_set(BundledPhotographs(image_size=16, crops_per_photo=per_photo, seed=1).images)
        assert not _crop_set(aux) & private
    calib = calibration_images(16, crops_per_photo=2, calibration_seed=7)
    allowed = _crop_set(BundledPhotographs(image_size=16, crops_per_photo=2, seed=7, pool="public").images)
    assert calib.shape[0] == 2 * n_public and _crop_set(calib) <= allowed
    # the calibrated victim's BN statistics are exactly those of the public images
    mean = torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(-1, 1, 1)
    model = bn_calibrated_classifier("resnet18", 10, image_size=16, seed=0, crops_per_photo=2)
    reference = calibrate_batchnorm(reinitialise(torchvision_classifier("resnet18", 10), 0), (calib - mean) / std)
    assert torch.allclose(model.bn1.running_mean, reference.bn1.running_mean, atol=1e-6)
    assert torch.allclose(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var, atol=1e-5)


# ------------------------------------------------------------------------ victims with fewer classes (14.6)
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("label_mode", ["unique", "repeated", "random"])
def test_select_batch_serves_a_victim_with_fewer_classes(photos, label_mode):
    """num_classes draws from the dataset's first num_classes classes only, for every seed; a seed whose
    batch already fits is unchanged (the shipped demos keep their batches)."""
    assert photos.num_classes > 10
    n = 4
    for seed in range(20):
        images, labels, indices = select_batch(photos, n, seed=seed, label_mode=label_mode, num_classes=10)
        assert int(labels.max()) < 10 and len(labels) == n
        assert torch.equal(labels, torch.tensor([photos.targets[i] for i in indices]))
        assert torch.equal(images, torch.stack([photos[i][0] for i in indices]))
        if label_mode == "unique":
            assert len(set(labels.tolist())) == n
        unrestricted = select_batch(photos, n, seed=seed, label_mode=label_mode)
        if int(unrestricted[1].max()) < 10:
            assert unrestricted[2] == indices
    with pytest.raises(ValueError, match="classes present with label < num_classes=3"):
        select_batch(photos, 4, seed=0, label_mode="unique", num_classes=3)


def _datamodule(config: str, **overrides):
    """The config's data section instantiated as the CLI does (jsonargparse), with overrides of its source's init_args."""
    import yaml
    from jsonargparse import ArgumentParser

    from lightning_gi.victim.datamodule import VictimDataModule

    data = yaml.safe_load((ROOT / config).read_text())["data"]
    data["init_args"]["source"]["init_args"].update(overrides)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VictimDataModule, "data")
    return parser.instantiate_classes(parser.parse_object({"data": data})).data


@pytest.mark.parametrize("config", ["configs/idlg_lenet.yaml", "configs/fedavg_lenet.yaml"])
def test_every_batch_seed_of_the_lenet_demos_builds_its_observation(config):
    """Issue 14.6: `--data.init_args.batch_seed=K` on a 10-class demo victim used to fail for some K
    ("dataset 'photographs' has labels up to 11 but the victim has num_classes=10")."""
    for seed in range(6):
        dm = _datamodule(config, batch_seed=seed)
        dm.setup("fit")
        truth = dm.ground_truth()
        assert dm.observation.batch_size == truth.labels.numel()
        assert 0 <= int(truth.labels.min()) and int(truth.labels.max()) < dm.num_classes, (seed, truth.labels)
