"""Safe generator loading: official-layout StyleGAN2-ADA pickles built here, malicious pickles, state dicts."""
from __future__ import annotations

import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from lightning_gi.checkpoints import CorruptCheckpointError, MissingCheckpointError, find_checkpoint
from lightning_gi.generators import (
    DCGANGenerator,
    StyleGAN2Generator,
    UnsafeCheckpointError,
    create_generator,
    filter_state_dict,
    load_generator_state,
    load_official_pickle,
    load_stylegan2_pkl,
    save_generator,
)
from lightning_gi.generators.loaders import PersistentRecord

SMALL = dict(z_dim=16, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=256, channel_max=32, num_fp16_res=2, conv_clamp=256))


# ---------------------------------------------------------------------------------------------- official layout
class _FakeOfficialModules:
    """Installs stand-ins for ``torch_utils.persistence`` and ``dnnlib.util`` so pickle can reference them
    by name, exactly as an official pickle does; removed again before anything is loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.names = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")

    def __enter__(self) -> "_FakeOfficialModules":
        torch_utils = types.ModuleType("torch_utils")
        persistence = types.ModuleType("torch_utils.persistence")
        marker = self.marker

        def _reconstruct_persistent_obj(meta):  # what the official unpickling would run: executes module_src
            exec(compile(meta["module_src"], "<embedded>", "exec"), {"MARKER": marker})
            raise AssertionError("the official reconstructor ran")

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
        torch_utils.persistence = persistence
        dnnlib = types.ModuleType("dnnlib")
        util = types.ModuleType("dnnlib.util")

        class EasyDict(dict):
            pass

        EasyDict.__module__ = "dnnlib.util"
        EasyDict.__qualname__ = "EasyDict"
        util.EasyDict = EasyDict
        dnnlib.util = util
        self.persistence, self.EasyDict = persistence, EasyDict
        self._saved = {n: sys.modules.get(n) for n in self.names}
        sys.modules.update({"torch_utils": torch_utils, "torch_utils.persistence": persistence, "dnnlib": dnnlib, "dnnlib.util": util})
        return self

    def __exit__(self, *exc) -> None:
        for n, m in self._saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


class _Record:
    """A persistent-class object as the official ``persistence`` decorator pickles it."""

    def __init__(self, fake: _FakeOfficialModules, class_name: str, state: dict, src: str) -> None:
        self.fake, self.class_name, self.state, self.src = fake, class_name, state, src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.src, class_name=self.class_name, state=self.state)
        return (self.fake.persistence._reconstruct_persistent_obj, (meta,))


def _evil_src(marker: str) -> str:
    return f"import pathlib\npathlib.Path({marker!r}).write_text('embedded source executed')\n"


def _to_record(fake: _FakeOfficialModules, module: torch.nn.Module, src: str, class_name: str | None = None, init_kwargs: dict | None = None) -> _Record:
    state = {
        "training": False,
        "_parameters": collections.OrderedDict(module._parameters),
        "_buffers": collections.OrderedDict(module._buffers),
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": collections.OrderedDict(),
        "_forward_hooks": collections.OrderedDict(),
        "_forward_pre_hooks": collections.OrderedDict(),
        "_state_dict_hooks": collections.OrderedDict(),
        "_load_state_dict_pre_hooks": collections.OrderedDict(),
        "_modules": collections.OrderedDict((k, _to_record(fake, m, src)) for k, m in module._modules.items()),
        "_init_args": (),
        "_init_kwargs": fake.EasyDict(init_kwargs or {}),
    }
    return _Record(fake, class_name or type(module).__name__, state, src)


def official_layout_pickle(path, generator: StyleGAN2Generator, marker: str, protocol: int = 3) -> None:
    """Write ``{"G", "D", "G_ema", "augment_pipe", "training_set_kwargs"}`` as stylegan2-ada-pytorch does."""
    with _FakeOfficialModules(marker) as fake:
        kw = generator.init_kwargs
        init = fake.EasyDict(kw, mapping_kwargs=fake.EasyDict(kw["mapping_kwargs"]), synthesis_kwargs=fake.EasyDict(kw["synthesis_kwargs"]))
        g = _to_record(fake, generator, _evil_src(marker), class_name="Generator", init_kwargs=init)
        d = _to_record(fake, torch.nn.Linear(4, 1), _evil_src(marker), class_name="Discriminator", init_kwargs={"c_dim": 0})
        data = {
            "G": g,
            "D": d,
            "G_ema": g,
            "augment_pipe": None,
            "training_set_kwargs": fake.EasyDict(path="~/datasets/x.zip", resolution=16, xflip=True, max_size=np.int64(70000), p=np.float64(0.2)),
        }
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)


def _randomised(seed: int = 0, **overrides) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    g = StyleGAN2Generator(**{**SMALL, **overrides}).eval()
    with torch.no_grad():  # non-trivial values everywhere (noise strengths and w_avg start at 0)
        for name, p in g.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)
        g.mapping.w_avg.normal_()
    return g


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_official_layout_round_trip_identical_outputs(tmp_path, protocol):
    marker = str(tmp_path / "PWNED")
    g = _randomised()
    pkl = tmp_path / "net.pkl"
    official_layout_pickle(pkl, g, marker, protocol=protocol)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules

    loaded = load_stylegan2_pkl(pkl)
    assert not os.path.exists(marker), "embedded source must never run"
    assert loaded.init_kwargs["synthesis_kwargs"]["channel_base"] == 256
    z = torch.randn(3, 16)
    with torch.no_grad():
        for psi in (1.0, 0.7):
            a = g(z, truncation_psi=psi, noise_mode="const")
            b = loaded(z, truncation_psi=psi, noise_mode="const")
            assert torch.equal(a, b)
    for k, v in g.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # through the registry, as a user would
    via_registry = create_generator("stylegan2", checkpoint_path=str(pkl))
    assert torch.equal(via_registry(z, noise_mode="const"), g(z, noise_mode="const"))
    assert via_registry.checkpoint_file == str(pkl)
    assert not os.path.exists(marker)


def test_official_pickle_records_are_data(tmp_path):
    marker = str(tmp_path / "PWNED")
    pkl = tmp_path / "net.pkl"
    official_layout_pickle(pkl, _randomised(), marker)
    data = load_official_pickle(pkl)
    assert set(data) == {"G", "D", "G_ema", "augment_pipe", "training_set_kwargs"}
    assert isinstance(data["G_ema"], PersistentRecord) and data["G_ema"].class_name == "Generator"
    assert data["G_ema"].module_src_chars > 0  # kept as a length only, never compiled
    assert data["training_set_kwargs"]["p"] == pytest.approx(0.2)
    assert data["D"].class_name == "Discriminator"
    with pytest.raises(CorruptCheckpointError, match="Discriminator"):
        load_stylegan2_pkl(pkl, key="D")
    assert not os.path.exists(marker)


def test_conditional_generator_round_trip(tmp_path):
    g = _randomised(c_dim=3, img_resolution=8)
    pkl = tmp_path / "cond.pkl"
    official_layout_pickle(pkl, g, str(tmp_path / "PWNED"))
    loaded = load_stylegan2_pkl(pkl)
    assert "mapping.embed.weight" in loaded.state_dict()
    z, c = torch.randn(2, 16), torch.eye(3)[:2]
    assert torch.equal(loaded(z, c, noise_mode="const"), g(z, c, noise_mode="const"))


def test_pickle_that_does_not_fit_is_reported(tmp_path):
    pkl = tmp_path / "net.pkl"
    official_layout_pickle(pkl, _randomised(), str(tmp_path / "PWNED"))
    with pytest.raises(CorruptCheckpointError, match="does not fit"):
        load_stylegan2_pkl(pkl, img_resolution=32)


# ---------------------------------------------------------------------------------------------- malicious
class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').write('x')",))


@pytest.mark.parametrize("payload", ["system", "eval", "nested"])
def test_malicious_pickle_cannot_run_code(tmp_path, payload):
    marker = str(tmp_path / "PWNED")
    pkl = tmp_path / "evil.pkl"
    if payload == "system":
        obj = {"G_ema": _Evil(marker)}
    elif payload == "eval":
        obj = {"G_ema": _EvalEvil(marker)}
    else:  # hidden inside an otherwise official-looking record's init kwargs
        with _FakeOfficialModules(marker) as fake:
            rec = _to_record(fake, _randomised(), _evil_src(marker), class_name="Generator", init_kwargs={"z_dim": _Evil(marker)})
            with open(pkl, "wb") as f:
                pickle.dump({"G_ema": rec}, f, protocol=3)
    if payload != "nested":
        with open(pkl, "wb") as f:
            pickle.dump(obj, f, protocol=3)
    # a plain pickle.load would run the payload; ours refuses before resolving the callable
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global"):
        load_stylegan2_pkl(pkl)
    with pytest.raises(UnsafeCheckpointError):
        create_generator("stylegan2", checkpoint_path=str(pkl))
    assert not os.path.exists(marker)


def test_corrupt_and_missing_pickles(tmp_path):
    pkl = tmp_path / "net.pkl"
    official_layout_pickle(pkl, _randomised(), str(tmp_path / "PWNED"))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pkl.read_bytes()[: len(pkl.read_bytes()) // 2])
    with pytest.raises(CorruptCheckpointError, match="corrupt, truncated"):
        load_stylegan2_pkl(truncated)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(CorruptCheckpointError):
        load_stylegan2_pkl(junk)
    for name, file in (("stylegan2_imagenet64", "stylegan2_imagenet64.pkl"), ("stylegan2_ffhq1024", "ffhq.pkl")):
        if find_checkpoint(file) is None:  # a developer may have the real file in ./checkpoints
            with pytest.raises(MissingCheckpointError, match=file):
                create_generator(name, pretrained=True)


# ---------------------------------------------------------------------------------------------- state dicts
def test_state_dict_files_filter_prefixes_and_shapes(tmp_path):
    torch.manual_seed(0)
    g = DCGANGenerator(32, z_dim=8, ngf=8).eval()
    z = torch.randn(2, 8)
    # Lightning-style checkpoint: generator.* next to other tensors
    ckpt = tmp_path / "attack.ckpt"
    sd = {f"generator.{k}": v for k, v in g.state_dict().items()}
    sd["latents"] = torch.zeros(3)
    torch.save({"state_dict": sd, "epoch": 0}, ckpt)
    g2 = load_generator_state(DCGANGenerator(32, z_dim=8, ngf=8).eval(), ckpt)
    assert torch.equal(g2(z), g(z))
    # safetensors
    from safetensors.torch import save_file

    st = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(st))
    g3 = load_generator_state(DCGANGenerator(32, z_dim=8, ngf=8).eval(), st)
    assert torch.equal(g3(z), g(z))
    # wrong width: shape mismatch named
    with pytest.raises(CorruptCheckpointError, match="shape mismatches: main.0.weight"):
        load_generator_state(DCGANGenerator(32, z_dim=8, ngf=16), ckpt)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        filter_state_dict({"main.0.weight": g.state_dict()["main.0.weight"]}, g)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CorruptCheckpointError):
        load_generator_state(g, bad)


def test_save_generator_round_trip_with_spec(tmp_path):
    torch.manual_seed(1)
    g = DCGANGenerator(64, z_dim=12, ngf=4).eval()
    path = save_generator(g, tmp_path / "g.pt")
    loaded = create_generator("dcgan_giml32", checkpoint_path=str(path))  # spec in the file overrides the variant
    assert loaded.resolution == 64 and loaded.z_dim == 12
    z = torch.randn(2, 12)
    assert torch.equal(loaded(z), g(z))
    # a weights_only load of the file works (no code in it)
    raw = torch.load(path, weights_only=True)
    assert raw["generator"]["architecture"] == "dcgan"
