"""StyleGAN2 / DCGAN generators and the registry."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_gi.checkpoints import MissingCheckpointError
from lightning_gi.generators import DCGANGenerator, StyleGAN2Generator, create_generator, get_generator_config, list_generators
from lightning_gi.generators.stylegan2 import conv2d_resample, setup_filter, upfirdn2d, upsample2d

SYN = dict(channel_base=256, channel_max=32)


def small(res: int, **kw) -> StyleGAN2Generator:
    torch.manual_seed(0)
    return StyleGAN2Generator(z_dim=16, w_dim=16, img_resolution=res, mapping_kwargs=dict(num_layers=2), synthesis_kwargs={**SYN, **kw}).eval()


@pytest.mark.parametrize("res", [4, 8, 16, 32])
@pytest.mark.parametrize("architecture", ["skip", "resnet", "orig"])
def test_stylegan2_forward_shapes_and_ranges(res, architecture):
    g = small(res, architecture=architecture)
    assert g.num_ws == 2 * int(math.log2(res)) - 2
    z = torch.randn(3, 16)
    img = g(z)
    assert img.shape == (3, 3, res, res) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    # an untrained generator is not range-limited, but stays O(1); a clamp bounds every layer
    assert img.abs().max() < 50
    clamped = small(res, architecture=architecture, conv_clamp=0.5)(z)
    assert torch.isfinite(clamped).all()
    # images differ across latents
    assert (img[0] - img[1]).abs().max() > 1e-4


def test_official_parameter_names_and_shapes():
    g = small(8)
    sd = g.state_dict()
    expected = {
        "mapping.fc0.weight": (16, 16),
        "mapping.fc1.bias": (16,),
        "mapping.w_avg": (16,),
        "synthesis.b4.const": (32, 4, 4),
        "synthesis.b4.resample_filter": (4, 4),
        "synthesis.b4.conv1.weight": (32, 32, 3, 3),
        "synthesis.b4.conv1.noise_strength": (),
        "synthesis.b4.conv1.noise_const": (4, 4),
        "synthesis.b4.conv1.affine.weight": (32, 16),
        "synthesis.b4.torgb.weight": (3, 32, 1, 1),
        "synthesis.b8.conv0.weight": (32, 32, 3, 3),
        "synthesis.b8.conv0.noise_const": (8, 8),
        "synthesis.b8.conv0.resample_filter": (4, 4),
        "synthesis.b8.torgb.affine.bias": (32,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(".skip." in k for k in sd)
    assert any(".skip." in k for k in small(8, architecture="resnet").state_dict())
    # channels per resolution: min(channel_base // res, channel_max)
    g2 = StyleGAN2Generator(z_dim=8, w_dim=8, img_resolution=32, synthesis_kwargs=dict(channel_base=512, channel_max=64))
    assert g2.synthesis.b32.conv1.weight.shape[0] == 16 and g2.synthesis.b8.conv1.weight.shape[0] == 64
    # equalised lr: stored weights unscaled, mapping lr_mul 0.01 -> gains
    assert g.mapping.fc0.weight_gain == pytest.approx(0.01 / 4) and g.mapping.fc0.bias_gain == 0.01


def test_truncation_psi_zero_gives_w_avg():
    g = small(16)
    with torch.no_grad():
        g.mapping.w_avg.normal_()
    z = torch.randn(4, 16)
    ws = g.mapping(z, truncation_psi=0.0)
    assert torch.allclose(ws, g.mapping.w_avg.expand_as(ws))
    cut = g.mapping(z, truncation_psi=0.0, truncation_cutoff=2)
    assert torch.allclose(cut[:, :2], g.mapping.w_avg.expand(4, 2, 16))
    assert not torch.allclose(cut[:, 2:], g.mapping.w_avg.expand(4, g.num_ws - 2, 16))
    half = g.mapping(z, truncation_psi=0.5)
    full = g.mapping(z)
    assert torch.allclose(half, g.mapping.w_avg + 0.5 * (full - g.mapping.w_avg), atol=1e-6)
    # the mapping network is not moving w_avg in eval or train mode unless asked
    before = g.mapping.w_avg.clone()
    g.train()(z)
    assert torch.equal(before, g.mapping.w_avg)


def test_noise_modes_and_latent_spaces():
    g = small(8)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
    ws = g.mapping(torch.randn(2, 16))
    a, b = g.synthesis(ws, noise_mode="const"), g.synthesis(ws, noise_mode="const")
    assert torch.equal(a, b)
    r1, r2 = g.synthesis(ws, noise_mode="random"), g.synthesis(ws, noise_mode="random")
    assert not torch.equal(r1, r2)
    none = g.synthesis(ws, noise_mode="none")
    assert not torch.equal(none, a)
    with pytest.raises(ValueError):
        g.synthesis(ws, noise_mode="bogus")
    g.noise_mode = "none"
    assert torch.equal(g.synthesis(ws), none)
    for space, shape in (("z", (3, 16)), ("w", (3, 16)), ("w+", (3, g.num_ws, 16))):
        lat = g.sample_latents(3, space, generator=torch.Generator().manual_seed(0))
        assert lat.shape == shape
        assert g.to_synthesis_input(lat, space).shape == (3, g.num_ws, 16)
    w = g.sample_latents(2, "w", truncation_psi=0.0)
    assert torch.allclose(w, g.mapping.w_avg.expand(2, 16))


def test_upsampling_fast_path_matches_reference():
    """The transposed-conv path equals the generic one (zero insertion, pad, FIR, conv with a flipped kernel)."""
    torch.manual_seed(0)
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    fast = conv2d_resample(x, w, f=f, up=2, padding=1, flip_weight=False)
    # reference: padding per the official code (px0 = 1 + 2, px1 = 1 + 1), gain up^2, then correlation with flipped w
    ref = F.conv2d(upfirdn2d(x, f, up=2, padding=[3, 2, 3, 2], gain=4), w.flip([2, 3]))
    assert fast.shape == (2, 4, 10, 10)
    assert torch.allclose(fast, ref, atol=1e-5)
    # upsample2d of a constant keeps the constant (filter gain) away from the borders
    up = upsample2d(torch.ones(1, 1, 6, 6), f)
    assert up.shape == (1, 1, 12, 12) and torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1, 1, 8, 8))


@pytest.mark.parametrize("res", [32, 64])
def test_dcgan_shapes_and_range(res):
    torch.manual_seed(0)
    g = DCGANGenerator(res, z_dim=20, ngf=8).eval()
    out = g(torch.randn(3, 20) * 10)
    assert out.shape == (3, 3, res, res)
    assert out.min() >= -1 and out.max() <= 1
    assert g.sample_latents(2).shape == (2, 20)
    with pytest.raises(ValueError):
        g.latent_shape("w")
    with pytest.raises(ValueError):
        DCGANGenerator(48)
    names = list(g.state_dict())
    assert names[0] == "main.0.weight"


def test_registry_lists_public_variants_and_configs():
    names = list_generators()
    for n in ("stylegan2", "dcgan32", "dcgan64", "stylegan2_ffhq1024", "stylegan2_ffhq256", "stylegan2_cifar10", "stylegan2_imagenet64", "dcgan_photos32"):
        assert n in names
    assert "dcgan32" not in list_generators(pretrained=True)
    cfg = get_generator_config("stylegan2_cifar10")
    assert cfg.resolution == 32 and cfg.c_dim == 10 and cfg.file == "cifar10.pkl" and cfg.output_range == (-1.0, 1.0)
    assert get_generator_config("stylegan2_ffhq1024").file == "ffhq.pkl"
    assert get_generator_config("stylegan2_imagenet64").resolution == 64
    # the GIAS authors' ImageNet generator: 512 px, 16 w's (pooled by 8 to the 64 px victim)
    cfg512 = get_generator_config("stylegan2_imagenet512")
    assert cfg512.resolution == 512 and cfg512.file == "stylegan2_imagenet512.pkl" and "pooled by 8" in cfg512.notes
    assert "64x64 as the GIAS authors did" not in get_generator_config("stylegan2_imagenet64").source
    small512 = create_generator("stylegan2_imagenet512", z_dim=8, w_dim=8, mapping_kwargs=dict(num_layers=1), synthesis_kwargs=dict(channel_base=512, channel_max=2))
    assert small512.img_resolution == 512 and small512.num_ws == 16
    with pytest.raises(ValueError, match="unknown generator"):
        create_generator("nope")
    g = create_generator("dcgan32", z_dim=10, ngf=4)
    assert g(torch.randn(1, 10)).shape == (1, 3, 32, 32) and not g.training
    s = create_generator("stylegan2", img_resolution=8, z_dim=8, w_dim=8, synthesis_kwargs=dict(channel_base=64, channel_max=16))
    assert s(torch.randn(1, 8)).shape == (1, 3, 8, 8)
    with pytest.raises(MissingCheckpointError, match="checkpoints/README.md"):
        create_generator("dcgan_photos32", checkpoint_path="no_such_generator_file.pt")


# ---------------------------------------------------------------- project-trained priors: PUBLIC pool only
def _rows(x: torch.Tensor) -> set[bytes]:
    return {img.contiguous().numpy().tobytes() for img in x}


@pytest.mark.parametrize("dataset", ["digits", "photographs"])
def test_prior_training_set_shares_no_image_with_the_private_pool(dataset):
    """GIAS's threat model: the generator is fitted to public data, disjoint from the attacked images."""
    from lightning_gi.generators.train_dcgan import public_training_set
    from lightning_gi.victim.data import BundledDigits, BundledPhotographs

    train = public_training_set(dataset, image_size=32, crops_per_photo=8, crop_seed=1)
    if dataset == "digits":
        private = [BundledDigits(image_size=32, channels=1, pool="private").images]
        assert len(train) == len(BundledDigits(image_size=32, channels=1, pool="public"))  # the whole public pool
    else:
        # the crops victims' batches are cut from (seed 0, the configs') and the crop seed the prior uses
        private = [BundledPhotographs(image_size=32, channels=3, crops_per_photo=8, seed=s).images for s in (0, 1)]
        assert len(train) == 2 * 8 * len(BundledPhotographs(image_size=32, crops_per_photo=1, pool="public"))
        from lightning_gi.generators.train_dcgan import photographs_training_set  # the older name, same pool

        assert not (_rows(photographs_training_set(32, crops_per_photo=8, crop_seed=1)) & set().union(*(_rows(p) for p in private)))
    assert train.min() >= 0 and train.max() <= 1 and len(train) > 100
    private_rows = set().union(*(_rows(p) for p in private))
    assert not (_rows(train) & private_rows), "a generator training image is a private (attacked) image"


def test_prior_registry_entries_are_trainable_and_public():
    from lightning_gi.generators.train_dcgan import prior_recipe

    digits = get_generator_config("dcgan_digits32")
    assert digits.file == "dcgan_digits32.pt" and "PUBLIC" in digits.dataset
    assert prior_recipe("dcgan_digits32")["dataset"] == "digits" and digits.kwargs["img_channels"] == 1
    photos = get_generator_config("dcgan_photos32")
    # the file name changed with the move to the public pool: an old file fitted to attacked photographs is not reused
    assert photos.file != "dcgan_photos32.pt" and "PUBLIC" in photos.dataset
    with pytest.raises(ValueError, match="not trained by train_dcgan"):
        prior_recipe("stylegan2_ffhq256")


def test_train_dcgan_shows_progress_on_stderr(capsys):
    from lightning_gi.generators.train_dcgan import fit_generator_glo, public_training_set

    torch.manual_seed(0)
    g = DCGANGenerator(32, z_dim=8, ngf=4, img_channels=1)
    stats = fit_generator_glo(g, public_training_set("digits")[:32], steps=4, batch_size=8, progress_every_s=0.0)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[train_dcgan] step")]
    assert len(lines) == 4 and "step 4/4" in lines[-1]  # throttle 0 s: one line per step
    assert "loss" in lines[-1] and "ETA" in lines[-1] and "elapsed" in lines[-1]
    assert "done in" in err and math.isfinite(stats["psnr"])
    fit_generator_glo(g, public_training_set("digits")[:32], steps=3, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""


def test_train_dcgan_command_writes_a_loadable_prior(tmp_path, capsys):
    """``lightning-gi train-dcgan`` (lightning_gi.tools.train_dcgan) with a tiny budget writes a loadable prior."""
    from lightning_gi.tools.train_dcgan import main

    out = tmp_path / "dcgan_digits32.pt"
    main(["--dataset", "digits", "--out", str(out), "--steps", "3", "--ngf", "4"])
    captured = capsys.readouterr()
    assert "step 3/3" in captured.err and "wrote" in captured.out
    g = create_generator("dcgan_digits32", checkpoint_path=str(out))
    assert g(torch.randn(2, g.z_dim)).shape == (2, 1, 32, 32) and g.ngf == 4


def test_build_generator_fits_a_missing_prior_where_the_lookup_finds_it(tmp_path, monkeypatch):
    """A project prior fitted on first use is written with resolve_checkpoint(if_missing="destination") and is
    the file the same name resolves to afterwards (here a bare name, $LIGHTNING_GI_CHECKPOINTS set)."""
    from lightning_gi.checkpoints import resolve_checkpoint
    from lightning_gi.generators import build_generator

    monkeypatch.setenv("LIGHTNING_GI_CHECKPOINTS", str(tmp_path))
    monkeypatch.setitem(get_generator_config("dcgan_digits32").extra["recipe"], "steps", 5)  # a short fit
    with pytest.warns(UserWarning, match="fitting it now"):
        g = build_generator("dcgan_digits32", checkpoint_path="first_use.pt", generator_kwargs={"ngf": 2}, train_if_missing=True)
    assert (tmp_path / "first_use.pt").is_file() and resolve_checkpoint("first_use.pt") == tmp_path / "first_use.pt"
    assert g.ngf == 2 and g.checkpoint_file == str(tmp_path / "first_use.pt")
    again = build_generator("dcgan_digits32", checkpoint_path="first_use.pt", train_if_missing=True)  # no second fit
    z = torch.randn(2, g.z_dim)
    assert torch.equal(again(z), g(z))
