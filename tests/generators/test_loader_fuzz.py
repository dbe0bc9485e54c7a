"""Fuzzing the StyleGAN2-ADA restricted unpickler (issue 16).

Two generators of hostile input:

* random opcode sequences built from the loader's allow-list (plus forbidden names, BUILD/REDUCE/NEWOBJ,
  memo and container opcodes, tensor/dtype/record fragments);
* mutations of a small official-layout StyleGAN2-ADA pickle (opcodes deleted, duplicated, swapped, replaced
  or inserted; bytes flipped; the file truncated).

Every example must end either in a loaded generator or in one of our errors (``CorruptCheckpointError`` and
its subclass ``UnsafeCheckpointError``), leave the process unchanged (a ``torch.load(weights_only=True)`` of
a known file gives identical tensors; torch's rebuild functions' ``__defaults__``/``__dict__``, our classes
and numpy's float64 dtype are untouched) and never crash the interpreter. The CI profile keeps both tests
under ~20 s; ``-m slow`` runs a larger one.
"""
from __future__ import annotations

import pickletools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_gi.checkpoints import CorruptCheckpointError
from lightning_gi.generators import load_stylegan2_pkl
from lightning_gi.generators.loaders import ALLOWED_GLOBALS
from test_loaders import (  # the opcode helpers and official-layout writer of the loader tests
    BUILD,
    FALSE,
    NONE,
    POP,
    TRUE,
    _randomised,
    _torch_save_bytes,
    assert_process_unchanged,
    official_layout_pickle,
    op_bytes,
    op_call,
    op_dict,
    op_global,
    op_int,
    op_record,
    op_str,
    op_tensor,
    op_tuple,
    process_state,
    storage_bytes,
)

CI = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))

_GLOBALS = [op_global(m, n) for m, n in ALLOWED_GLOBALS] + [
    op_global("torch._utils", "_rebuild_sparse_tensor"),
    op_global("torch._utils", "_rebuild_tensor"),
    op_global("os", "system"),
    op_global("builtins", "getattr"),
]
_STRINGS = ["__defaults__", "__dict__", "__setstate__", "neg", "conj", "f8", "V8", "i8", "b1", "O", "<", "|", "=",
            "class", "type", "state", "class_name", "Generator", "_modules", "_parameters", "_init_kwargs",
            "img_resolution", "G_ema", "latin1", "\u00ff"]
_EVIL_STATE = op_tuple(NONE, op_dict((op_str("__defaults__"), op_tuple(op_dict((op_str("neg"), TRUE))))))
_FRAGMENTS = (
    _GLOBALS
    + [op_str(s) for s in _STRINGS]
    + [op_int(n) for n in (0, 1, -1, 2, 3, 8, 16, 4096, 2**31, 2**40, -(2**63))]
    + [NONE, TRUE, FALSE, op_bytes(b""), op_bytes(b"\x01" * 8), op_bytes(storage_bytes(torch.arange(4.0)))]
    + [op_bytes(_torch_save_bytes(x)) for x in (torch.ones(2), torch.sparse_coo, torch.ones(2).to_sparse())]
    + [op_tensor(torch.arange(6.0).reshape(2, 3)), op_tensor(torch.tensor([1, 2])),
       op_call(op_global("numpy", "dtype"), op_str("f8"), FALSE, TRUE),
       op_tuple(op_int(3), op_str("<"), NONE, NONE, NONE, op_int(-1), op_int(-1), op_int(0)),
       op_record(op_dict((op_str("_init_kwargs"), op_dict((op_str("img_resolution"), op_int(8)))))),
       _EVIL_STATE]
    + [g + state + BUILD for g in _GLOBALS for state in (_EVIL_STATE, op_dict((op_str("x"), TRUE)))]
    # single opcodes: containers, calls, state changes, memo, stack, extensions, persistent ids
    + [bytes([c]) for c in b"(t\x85\x86\x87)}]\x8fsuae\x90\x91Rb\x81\x92o02\x94ldQ"]
    + [b"h" + bytes([i]) for i in range(4)] + [b"q" + bytes([i]) for i in range(4)] + [b"\x82\x01", BUILD, POP]
)


def _check(path, data: bytes, reference_file) -> None:
    """Load ``data``: a generator or one of our errors, and nothing outside the result changed."""
    before = process_state()
    path.write_bytes(data)
    try:
        load_stylegan2_pkl(path)
    except CorruptCheckpointError as err:  # UnsafeCheckpointError is a subclass
        message = str(err)
        assert message and "\n" not in message, message
    assert_process_unchanged(reference_file, before)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def reference_file(fuzz_dir):
    ref = fuzz_dir / "reference.pt"
    torch.save({"w": torch.arange(1.0, 7.0).reshape(2, 3), "i": torch.tensor([3, -4])}, ref)
    return ref, torch.load(ref, weights_only=True)


@pytest.fixture(scope="module")
def official_ops(fuzz_dir):
    """The opcodes of a small official-layout pickle (as byte segments) to mutate."""
    path = fuzz_dir / "official.pkl"
    official_layout_pickle(path, _randomised(img_resolution=8), str(fuzz_dir / "PWNED"))
    data = path.read_bytes()
    starts = [pos for _, _, pos in pickletools.genops(data)] + [len(data)]
    return [data[a:b] for a, b in zip(starts, starts[1:])]


def _opcode_program(fragments: list[bytes]) -> bytes:
    return b"\x80\x04" + b"".join(fragments) + b"."


_mutation = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 10**6)),
    st.tuples(st.just("duplicate"), st.integers(0, 10**6)),
    st.tuples(st.just("swap"), st.integers(0, 10**6), st.integers(0, 10**6)),
    st.tuples(st.just("replace"), st.integers(0, 10**6), st.sampled_from(_FRAGMENTS)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.sampled_from(_FRAGMENTS)),
    st.tuples(st.just("flip"), st.integers(0, 10**7), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**7)),
)


def _mutate(ops: list[bytes], mutations: list[tuple]) -> bytes:
    ops = list(ops)
    flips, cut = [], None
    for kind, *args in mutations:
        i = args[0] % len(ops)
        if kind == "delete" and len(ops) > 1:
            del ops[i]
        elif kind == "duplicate":
            ops.insert(i, ops[i])
        elif kind == "swap":
            j = args[1] % len(ops)
            ops[i], ops[j] = ops[j], ops[i]
        elif kind == "replace":
            ops[i] = args[1]
        elif kind == "insert":
            ops.insert(i, args[1])
        elif kind == "flip":
            flips.append((args[0], args[1]))
        elif kind == "truncate":
            cut = args[0]
    data = bytearray(b"".join(ops))
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    return bytes(data[: None if cut is None else cut % (len(data) + 1)])


def _random_programs(fuzz_dir, reference_file):
    @given(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=40))
    def run(fragments):
        _check(fuzz_dir / "random.pkl", _opcode_program(fragments), reference_file)

    return run


def _mutated_official(fuzz_dir, reference_file, official_ops):
    @given(st.lists(_mutation, min_size=1, max_size=4))
    def run(mutations):
        _check(fuzz_dir / "mutated.pkl", _mutate(official_ops, mutations), reference_file)

    return run


def test_unmutated_official_pickle_loads(fuzz_dir, official_ops):
    """Sanity check of the fuzz seed: the official-layout pickle itself loads."""
    path = fuzz_dir / "seed.pkl"
    path.write_bytes(b"".join(official_ops))
    assert load_stylegan2_pkl(path).img_resolution == 8


def test_fuzz_random_opcode_programs(fuzz_dir, reference_file):
    settings(max_examples=600, **CI)(_random_programs(fuzz_dir, reference_file))()


def test_fuzz_mutated_official_pickles(fuzz_dir, reference_file, official_ops):
    settings(max_examples=100, **CI)(_mutated_official(fuzz_dir, reference_file, official_ops))()


@pytest.mark.slow
def test_fuzz_large_profile(fuzz_dir, reference_file, official_ops):
    settings(max_examples=20_000, **CI)(_random_programs(fuzz_dir, reference_file))()
    settings(max_examples=3_000, **CI)(_mutated_official(fuzz_dir, reference_file, official_ops))()


def test_hostile_fragments_are_refused(fuzz_dir, reference_file):
    """A few fixed programs from the fuzz vocabulary, so a regression shows without relying on the search."""
    for program in (
        [op_global("torch._utils", "_rebuild_tensor_v2"), _EVIL_STATE, BUILD],
        [op_global("os", "system"), op_tuple(op_str("true")), b"R"],
        [op_call(op_global("numpy", "dtype"), op_str("O"), FALSE, TRUE)],
        [op_bytes(b"x"), op_tuple(), b"R"],  # REDUCE on a non-callable handle
    ):
        _check(fuzz_dir / "fixed.pkl", _opcode_program(program), reference_file)
