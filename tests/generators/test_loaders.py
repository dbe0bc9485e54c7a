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
from factories import _evil_src, _FakeOfficialModules, _to_record, official_layout_pickle  # noqa: E402,F401 (shared with tests/test_configs.py)


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


# ---------------------------------------------------------------------------------------------- hostile pickles
# Pickles written opcode by opcode (protocol 3), so the tests control exactly what the loader sees.
import io
import struct
import subprocess
import textwrap
import warnings

import torch._utils as torch_utils_mod

from lightning_gi.generators.loaders import AttrDict, RestrictedUnpickler


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def op_bytes(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b


def op_int(n: int) -> bytes:
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


NONE, TRUE, FALSE, BUILD, POP = b"N", b"\x88", b"\x89", b"b", b"0"


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_call(func: bytes, *args: bytes) -> bytes:
    return func + op_tuple(*args) + b"R"


def op_dict(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def op_pickle(body: bytes) -> bytes:
    return b"\x80\x03" + body + b"."


def storage_bytes(t: torch.Tensor) -> bytes:
    """The bytes an official pickle stores for ``t``'s storage (``torch.storage._load_from_bytes``' argument)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return t.storage().__reduce__()[1][0]


def op_storage(payload: bytes) -> bytes:
    return op_call(op_global("torch.storage", "_load_from_bytes"), op_bytes(payload))


def op_tensor(t: torch.Tensor) -> bytes:
    return op_call(
        op_global("torch._utils", "_rebuild_tensor_v2"),
        op_storage(storage_bytes(t)), op_int(0), op_tuple(*map(op_int, t.shape)), op_tuple(*map(op_int, t.stride())),
        FALSE, op_call(op_global("collections", "OrderedDict")),
    )


def op_record(state: bytes, class_name: str = "Generator") -> bytes:
    meta = op_dict((op_str("type"), op_str("class")), (op_str("class_name"), op_str(class_name)), (op_str("state"), state))
    return op_call(op_global("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)


REBUILD_FUNCTIONS = {n: getattr(torch_utils_mod, n) for n in dir(torch_utils_mod) if n.startswith("_rebuild")}


def process_state() -> dict:
    """What a hostile pickle must not change: torch's rebuild functions, our classes, numpy's builtin dtypes."""
    return {
        **{n: (f.__defaults__, f.__kwdefaults__, dict(getattr(f, "__dict__", {}))) for n, f in REBUILD_FUNCTIONS.items()},
        "AttrDict": dict(vars(AttrDict)),
        "dispatch": dict(getattr(RestrictedUnpickler, "dispatch", {})),
        "float64": (np.dtype("f8").fields, np.dtype("f8").itemsize, np.dtype("f8").str),
        "sparse_pending": list(getattr(torch_utils_mod, "_sparse_tensors_to_validate", [])),
    }


@pytest.fixture
def reference_file(tmp_path):
    """A known weights_only file; loading it must give the same tensors before and after any hostile load."""
    ref = tmp_path / "reference.pt"
    torch.save({"w": torch.arange(1.0, 7.0).reshape(2, 3), "i": torch.tensor([3, -4])}, ref)
    return ref, torch.load(ref, weights_only=True)


def assert_process_unchanged(reference_file, state_before: dict) -> None:
    ref, expected = reference_file
    again = torch.load(ref, weights_only=True)  # raises here if a pending sparse tensor was left behind
    for k, v in expected.items():
        assert torch.equal(again[k], v) and not again[k].is_neg() and not again[k].is_conj(), k
    assert process_state() == state_before


_EVIL_DEFAULTS = op_tuple(NONE, op_dict((op_str("__defaults__"), op_tuple(op_dict((op_str("neg"), TRUE)))))) + BUILD


@pytest.mark.parametrize(
    "body",
    [
        # issue 16 item 1: BUILD sets __defaults__ on torch's _rebuild_tensor_v2 -> every later torch.load negated
        op_global("torch._utils", "_rebuild_tensor_v2") + _EVIL_DEFAULTS + POP + NONE,
        op_global("torch._utils", "_rebuild_parameter") + op_dict((op_str("pwned"), TRUE)) + BUILD + POP + NONE,
        op_global("dnnlib.util", "EasyDict") + op_tuple(NONE, op_dict((op_str("pwned"), TRUE))) + BUILD + POP + NONE,
        op_global("torch_utils.persistence", "_reconstruct_persistent_obj") + op_dict((op_str("pwned"), TRUE)) + BUILD + POP + NONE,
        op_global("numpy", "dtype") + op_dict((op_str("pwned"), TRUE)) + BUILD + POP + NONE,
    ],
    ids=["tensor_v2_defaults", "parameter_dict", "easydict_class", "persistence_fn", "numpy_dtype_fn"],
)
def test_build_on_an_allowed_global_cannot_poison_later_loads(tmp_path, reference_file, body):
    before = process_state()
    pkl = tmp_path / "poison.pkl"
    pkl.write_bytes(op_pickle(body))
    with pytest.raises(UnsafeCheckpointError, match="BUILD"):
        load_official_pickle(pkl)
    assert_process_unchanged(reference_file, before)


def _void_scalar_pickle(field_offset: int, base: str = "V8") -> bytes:
    """numpy scalar whose dtype's BUILD moves a field ``field_offset`` bytes past an 8-byte buffer."""
    i8 = op_call(op_global("numpy", "dtype"), op_str("i8"), FALSE, TRUE) + op_tuple(op_int(3), op_str("<"), NONE, NONE, NONE, op_int(-1), op_int(-1), op_int(0)) + BUILD
    fields = op_dict((op_str("a"), op_tuple(i8, op_int(field_offset))))
    dtype = op_call(op_global("numpy", "dtype"), op_str(base), FALSE, TRUE) + op_tuple(op_int(3), op_str("|"), NONE, op_tuple(op_str("a")), fields, op_int(8), op_int(1), op_int(16)) + BUILD
    scalar = op_call(op_global("numpy.core.multiarray", "scalar"), dtype, op_bytes(b"\x01" * 8))
    return op_pickle(op_dict((op_str("G_ema"), op_record(op_dict((op_str("_init_kwargs"), op_dict((op_str("z_dim"), scalar))))))))


def _load_in_subprocess(*pkls) -> subprocess.CompletedProcess:
    """load_stylegan2_pkl of each file in one fresh interpreter: exit 0 = every file refused with our error and
    numpy's builtin dtypes intact; 3 = a file loaded; anything else = another exception or a crash (139 = segfault)."""
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from lightning_gi.checkpoints import CorruptCheckpointError
        from lightning_gi.generators.loaders import load_stylegan2_pkl
        for pkl in {[str(p) for p in pkls]!r}:
            try:
                data = load_stylegan2_pkl(pkl)
            except CorruptCheckpointError as err:
                print("REFUSED", type(err).__name__, err, flush=True)
                continue
            print("LOADED", repr(data), flush=True)
            sys.exit(3)
        sys.exit(0 if np.dtype("f8").fields is None else 5)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)


def test_numpy_dtype_state_cannot_read_out_of_bounds(tmp_path):
    """Issue 16 item 2: a dtype BUILD moving a field 64 bytes / 1 TB past an 8-byte scalar leaked heap bytes or
    crashed (also on numpy's shared float64 dtype); plus a 200,000-deep tuple used as a dict key, whose hash
    overflows the C stack. Run in a subprocess, so a crash of the old loader shows as exit 139, not a dead pytest."""
    pkls = []
    for name, offset, base in (("heap_leak", 64, "V8"), ("segfault", 1 << 40, "V8"), ("f8_mutated", 1 << 40, "f8")):
        pkls.append(tmp_path / f"{name}.pkl")
        pkls[-1].write_bytes(_void_scalar_pickle(offset, base))
    pkls.append(tmp_path / "deep_key.pkl")
    pkls[-1].write_bytes(op_pickle(op_dict((b")" + b"\x85" * 200_000, NONE))))
    proc = _load_in_subprocess(*pkls)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-400:]} {proc.stderr[-300:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("REFUSED UnsafeCheckpointError") for line in lines[:3]), lines
    assert lines[3].startswith("REFUSED CorruptCheckpointError") and "nested more than" in lines[3]


def _torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_storage_record_cannot_smuggle_torch_functions(tmp_path, reference_file):
    """Issue 16 item 3: the inner weights_only load returns torch's own _rebuild_sparse_tensor (and a layout);
    calling it built an unvalidated sparse tensor that made the next unrelated torch.load fail."""
    before = process_state()
    sparse_fn = op_storage(_torch_save_bytes(torch_utils_mod._rebuild_sparse_tensor))
    layout = op_storage(_torch_save_bytes(torch.sparse_coo))
    indices, values = op_tensor(torch.tensor([[10**6]])), op_tensor(torch.tensor([1.0]))
    sparse = sparse_fn + op_tuple(layout, op_tuple(indices, values, op_tuple(op_int(2)))) + b"R"
    pkl = tmp_path / "sparse.pkl"
    pkl.write_bytes(op_pickle(op_dict((op_str("G_ema"), sparse))))
    with pytest.raises(UnsafeCheckpointError, match="storage record"):
        load_official_pickle(pkl)
    assert_process_unchanged(reference_file, before)
    # the function itself as data is refused too, and a storage record must yield a dense CPU storage/tensor
    for inner in (torch_utils_mod._rebuild_tensor_v2, {"x": torch.ones(1)}, torch.ones(2).to_sparse()):
        pkl.write_bytes(op_pickle(op_storage(_torch_save_bytes(inner))))
        with pytest.raises(UnsafeCheckpointError):
            load_official_pickle(pkl)
    assert_process_unchanged(reference_file, before)


_DEEP_PREFIX = op_global("torch_utils.persistence", "_reconstruct_persistent_obj") + b"(" + b"}(" + op_str("type") + op_str("class") + op_str("class_name") + op_str("Generator") + op_str("state") + b"}(" + op_str("_modules") + b"}(" + op_str("m")


_DEEP_KWARGS = op_dict((op_str("_init_kwargs"), op_dict((op_str("x"), b"]" * 5000 + b"a" * 4999))))


def _cyclic_record() -> bytes:
    modules = b"}q\x01" + POP  # memoised empty dict, later given the record itself as child 'm'
    record = op_record(op_dict((op_str("_modules"), b"h\x01"))) + b"q\x02"
    return op_pickle(modules + b"}(" + op_str("G_ema") + record + b"h\x01" + op_str("m") + b"h\x02" + b"s" + POP + b"u")


@pytest.mark.parametrize(
    "data,match",
    [
        (op_pickle(op_dict((op_str("G_ema"), _DEEP_PREFIX * 5000 + NONE + b"uuutR" * 5000))), "nested more than"),
        (_cyclic_record(), "cycle"),
        (op_pickle(op_dict((op_str("G_ema"), op_record(_DEEP_KWARGS)))), "nested more than"),
    ],
    ids=["5000_deep_records", "cyclic_record", "5000_deep_kwargs"],
)
def test_deep_or_cyclic_records_are_one_sentence_errors(tmp_path, data, match):
    """Issue 16 item 4: these gave a raw RecursionError (or a segfault for the tuple key)."""
    pkl = tmp_path / "deep.pkl"
    pkl.write_bytes(data)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        load_stylegan2_pkl(pkl)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize(
    "init,match",
    [
        (dict(img_resolution=4096), "img_resolution must be an integer in"),
        (dict(img_resolution=48), "power of two"),
        (dict(synthesis_kwargs=dict(channel_base=2**40, channel_max=2**40)), "channel_base"),
        (dict(mapping_kwargs=dict(num_layers=10**6)), "num_layers"),
        (dict(w_dim=True), "w_dim"),
        (dict(z_dim=4096, w_dim=4096, mapping_kwargs=dict(num_layers=32), synthesis_kwargs=dict(channel_base=2**20, channel_max=2048), img_resolution=2048), "parameters"),
    ],
    ids=["res_4096", "res_48", "channels_2^40", "layers_1e6", "bool_w_dim", "too_many_params"],
)
def test_architecture_arguments_are_bounded_before_allocation(tmp_path, init, match):
    """Issue 16 item 4: a huge img_resolution/width tried to allocate gigabytes (or terabytes) before failing."""
    g = _randomised()
    pkl = tmp_path / "net.pkl"
    official_layout_pickle(pkl, g, str(tmp_path / "PWNED"))
    with pytest.raises(CorruptCheckpointError, match=match):
        load_stylegan2_pkl(pkl, **init)


def test_one_tensor_referenced_thousands_of_times_is_refused(tmp_path):
    """Issue 16 item 4 (allocation): a 4 MB tensor named 3,000 times in a record's _parameters (memo references)
    made record_state_dict copy it 3,000 times (12 GB) before any shape check; now refused while loading."""
    tensor = op_tensor(torch.zeros(1 << 20)) + b"q\x05"
    params = b"}(" + op_str("p0") + tensor + b"".join(op_str(f"p{i}") + b"h\x05" for i in range(1, 3000)) + b"u"
    pkl = tmp_path / "reuse.pkl"
    pkl.write_bytes(op_pickle(op_dict((op_str("G_ema"), op_record(op_dict((op_str("_parameters"), params)))))))
    with pytest.raises(CorruptCheckpointError, match="more tensor bytes than the file holds"):
        load_stylegan2_pkl(pkl)


# ---------------------------------------------------------------------------------------------- one resolver
def test_resolve_checkpoint_reads_searched_files_and_writes_where_the_search_looks_first(tmp_path, monkeypatch):
    """Issue 13.5: every generator file (GIAS, GIML's output, train-dcgan's default, aux statistics) is located by
    ``resolve_checkpoint``; a bare name written with ``if_missing="destination"`` is the one a later lookup finds."""
    from lightning_gi.checkpoints import resolve_checkpoint
    from lightning_gi.generators.registry import generator_file

    first, later = tmp_path / "env", tmp_path / "work"
    (later / "checkpoints").mkdir(parents=True)
    monkeypatch.chdir(later)
    monkeypatch.setenv("LIGHTNING_GI_CHECKPOINTS", str(first))
    (later / "checkpoints" / "g.pt").write_bytes(b"x")
    assert resolve_checkpoint("g.pt") == later / "checkpoints" / "g.pt"
    assert resolve_checkpoint("missing.pt", if_missing="none") is None
    with pytest.raises(MissingCheckpointError, match="for a test.*missing.pt"):
        resolve_checkpoint("missing.pt", "for a test")
    # writing: the first directory searched, never over a file found further down
    dest = resolve_checkpoint("g.pt", if_missing="destination")
    assert dest == first / "g.pt"
    save_generator(DCGANGenerator(resolution=32, z_dim=4, ngf=2), dest)
    assert resolve_checkpoint("g.pt") == dest and (later / "checkpoints" / "g.pt").read_bytes() == b"x"
    explicit = tmp_path / "elsewhere" / "g.pt"
    assert resolve_checkpoint(explicit, if_missing="destination") == explicit
    monkeypatch.delenv("LIGHTNING_GI_CHECKPOINTS")
    assert resolve_checkpoint("new.pt", if_missing="destination") == later / "checkpoints" / "new.pt"
    with pytest.raises(ValueError, match="if_missing"):
        resolve_checkpoint("g.pt", if_missing="download")
    # which file a generator spec loads: the explicit file, else the registry's when pretrained, else none
    assert generator_file("dcgan_digits32") == "dcgan_digits32.pt"
    assert generator_file("dcgan_digits32", checkpoint_path="mine.pt") == "mine.pt"
    assert generator_file("dcgan32", pretrained=False) is None
    with pytest.raises(ValueError, match="no pretrained file"):
        generator_file("dcgan32")


def test_missing_auxiliary_statistics_name_the_command_that_makes_them(tmp_path, monkeypatch):
    from lightning_gi.labels import load_auxiliary_stats

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_GI_CHECKPOINTS", raising=False)
    with pytest.raises(FileNotFoundError, match="lightning-gi aux-stats"):
        load_auxiliary_stats("no_such_stats.pt")
