"""Loading generator checkpoints without executing code from them.

Three sources:

* NVIDIA's official StyleGAN2-ADA ``.pkl`` (a pickle of ``{"G", "D", "G_ema", "augment_pipe",
  "training_set_kwargs"}``). Each network in it is a *persistent class* record: normal unpickling calls
  ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, which EXECUTES the network source code
  embedded in ``meta["module_src"]``. :class:`RestrictedUnpickler` reads such a file as data only:

  - it resolves only the names in :data:`ALLOWED_GLOBALS`, and what it hands to the pickle for them is a
    fresh handle of its own (:class:`_Global`), never the library object (a pickle could otherwise set
    attributes on, e.g., torch's ``_rebuild_tensor_v2`` and corrupt every later ``torch.load``);
  - the persistence reconstructor becomes a function that only returns a :class:`PersistentRecord` (class
    name + the module's state); the embedded source is never compiled or run;
  - pickle's BUILD (state change) is accepted only on the two objects that need it, an ``EasyDict`` and a
    numpy dtype record, and the dtype's new state is validated (builtin numeric types only, no fields);
  - every tensor storage is read with ``torch.load(..., weights_only=True)`` and the result must be a
    CPU storage/dense tensor of an allowed dtype; tensor views must lie inside their storage, carry no
    hooks/metadata, and the total tensor data cannot exceed what the file holds;
  - tuples are nested at most :data:`MAX_NESTING` levels while loading, and the loaded data is checked
    (iteratively) for cycles, nesting depth and size before anything walks it recursively;
  - every refusal is an :class:`UnsafeCheckpointError` or
    :class:`~lightning_gi.checkpoints.CorruptCheckpointError` with a one-sentence message.
* plain state dicts (``.pt`` / ``.pth`` / Lightning ``.ckpt``, read with ``weights_only=True``);
* ``.safetensors``.

Whatever the source, :func:`filter_state_dict` maps names to the model's (strips ``generator.``, ``G_ema.``,
``module.`` ... prefixes) and checks shapes, raising :class:`~lightning_gi.checkpoints.CorruptCheckpointError`
that names the file and lists missing / unexpected / mismatched tensors. The architecture arguments of a
pickle are bounded (:data:`GENERATOR_LIMITS`) before anything is allocated. See ``docs/security.md``.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from ..checkpoints import CHECKPOINTS_README, CorruptCheckpointError, load_state_dict_file, resolve_checkpoint

__all__ = [
    "UnsafeCheckpointError",
    "PersistentRecord",
    "RestrictedUnpickler",
    "ALLOWED_GLOBALS",
    "ALLOWED_TENSOR_DTYPES",
    "MAX_NESTING",
    "GENERATOR_LIMITS",
    "load_official_pickle",
    "record_state_dict",
    "load_stylegan2_pkl",
    "filter_state_dict",
    "load_generator_state",
    "read_generator_file",
]

STRIP_PREFIXES = ("generator.", "G_ema.", "G.", "module.", "_orig_mod.", "model.")

#: Deepest nesting of containers (dicts, lists, tuples, records) accepted in a pickle.
MAX_NESTING = 100
#: Most objects the loaded data may hold when walked as a tree (shared references counted every time).
MAX_TREE_NODES = 2_000_000
#: Most dimensions of one tensor.
MAX_TENSOR_DIMS = 16
#: Tensor dtypes a checkpoint may hold (no complex, quantized or object-like types).
ALLOWED_TENSOR_DTYPES = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool}
)
#: Inclusive bounds of a StyleGAN2 generator's architecture arguments (checked before construction).
GENERATOR_LIMITS: dict[str, tuple[int, int]] = {
    "z_dim": (1, 4096),
    "c_dim": (0, 16384),
    "w_dim": (1, 4096),
    "img_resolution": (4, 2048),  # and a power of two
    "img_channels": (1, 16),
    "mapping.num_layers": (1, 32),
    "mapping.embed_features": (1, 4096),
    "mapping.layer_features": (1, 4096),
    "synthesis.channel_base": (1, 1 << 20),
    "synthesis.channel_max": (1, 2048),
    "synthesis.num_fp16_res": (0, 11),
}
#: Most parameters a generator built from a pickle may have (the official 1024x1024 FFHQ one has about 30M).
MAX_GENERATOR_PARAMS = 200_000_000


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint asks to import, call or modify something outside the loader's allow-list (refused, not run)."""


@dataclass
class PersistentRecord:
    """What an official persistent-class record holds, as data: nothing of it is executed."""

    class_name: str
    state: dict[str, Any]
    module_src_chars: int = 0
    version: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return _plain(self.state.get("_init_kwargs") or {})

    def children(self) -> dict[str, Any]:
        return dict(self.state.get("_modules") or {})


def _plain(obj: Any) -> Any:
    """EasyDict/OrderedDict -> plain Python containers (the loader already turned numpy scalars into numbers)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


class AttrDict(dict):
    """Replaces ``dnnlib.util.EasyDict`` (a dict subclass): a plain dict; a BUILD state only adds items."""

    def _apply_state(self, state: Any, source: str) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if state is None:
            return
        if type(state) not in _DICT_TYPES:
            raise UnsafeCheckpointError(f"{source}: an EasyDict record has a state of type {type(state).__name__} (only a dict of items is accepted)")
        self.update(state)


_DICT_TYPES = (dict, AttrDict, collections.OrderedDict)
_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray)


class _Global:
    """What the pickle gets for an allowed global: an inert handle of ours, never the library object itself.

    The handle cannot be modified (pickle's BUILD is refused on it) and is created afresh for every load.
    """

    __slots__ = ("name", "call", "newobj")

    def __init__(self, name: str, call: Callable[..., Any], newobj: bool = False) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "call", call)
        object.__setattr__(self, "newobj", newobj)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("allowed-global handles are read-only")

    def __repr__(self) -> str:
        return f"<allowed global {self.name}>"


class _StorageRef:
    """A tensor storage read by this loader (CPU, allowed dtype); only :meth:`RestrictedUnpickler` uses it."""

    __slots__ = ("untyped", "dtype", "numel")

    def __init__(self, untyped: Any, dtype: torch.dtype, numel: int) -> None:
        self.untyped, self.dtype, self.numel = untyped, dtype, numel


class _DtypeSpec:
    """A numpy dtype record (``numpy.dtype(...)`` + optional BUILD), validated before and after its state change."""

    __slots__ = ("dtype", "built")

    def __init__(self, dtype: Any) -> None:
        self.dtype, self.built = dtype, False

    def apply_state(self, state: Any, source: str) -> None:
        """numpy's ``dtype.__setstate__`` tuple, accepted only when it describes the same builtin numeric type."""
        dt = self.dtype
        if self.built:
            raise UnsafeCheckpointError(f"{source}: a numpy dtype record receives a second state change (refused)")
        if type(state) is not tuple or len(state) not in (8, 9):
            raise CorruptCheckpointError(f"{source}: a numpy dtype record has a malformed state")
        version, order, subarray, names, fields, elsize, alignment, flags = state[:8]
        if subarray is not None or names is not None or fields is not None or (len(state) == 9 and state[8] is not None):
            raise UnsafeCheckpointError(f"{source}: a numpy dtype record with fields, a sub-array or metadata is refused (builtin numeric types only)")
        if (
            type(version) is not int or version not in (3, 4) or type(elsize) is not int or type(alignment) is not int
            or type(flags) is not int or elsize not in (-1, dt.itemsize) or alignment not in (-1, dt.alignment) or flags not in (0, dt.flags)
        ):
            raise UnsafeCheckpointError(f"{source}: a numpy dtype record's state does not match its type {dt.str!r} (refused)")
        if order not in ("<", ">", "|", "=") or (order == "|") != (dt.itemsize == 1):
            raise CorruptCheckpointError(f"{source}: a numpy dtype record has an invalid byte order {order!r}")
        new = dt if dt.itemsize == 1 else dt.newbyteorder(order)
        _check_numpy_dtype(new, source)
        if new.itemsize != dt.itemsize or new.kind != dt.kind:
            raise UnsafeCheckpointError(f"{source}: a numpy dtype record changed its type in a state change (refused)")
        self.dtype, self.built = new, True


def _check_numpy_dtype(dt: Any, source: str) -> None:
    if dt.kind not in "biufc" or dt.hasobject or dt.fields is not None or dt.subdtype is not None or dt.metadata or dt.itemsize > 16:
        raise UnsafeCheckpointError(f"{source}: numpy dtype {str(dt)[:40]!r} is refused (builtin numeric types only)")


def _codecs_encode(text: Any, encoding: Any = "utf-8", source: str = "<pickle>") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError(f"{source}: unexpected _codecs.encode record (only text to latin1/utf-8 bytes is accepted)")
    return text.encode(encoding)


def _as_int(value: Any, what: str, source: str) -> int:
    if type(value) is not int:
        raise CorruptCheckpointError(f"{source}: {what} is a {type(value).__name__}, not an integer")
    return value


def _reconstruct_persistent_record(meta: Any, source: str = "<pickle>") -> PersistentRecord:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: returns the record's data only."""
    if type(meta) not in _DICT_TYPES or meta.get("type") != "class" or type(meta.get("state")) not in _DICT_TYPES:
        raise UnsafeCheckpointError(f"{source}: malformed persistent-class record in the pickle (expected type='class' with a state dict)")
    name, src, version = meta.get("class_name"), meta.get("module_src"), meta.get("version")
    if type(name) is not str or len(name) > 200:
        raise CorruptCheckpointError(f"{source}: a persistent-class record has no valid class name")
    return PersistentRecord(
        class_name=name,
        state=dict(meta["state"]),
        module_src_chars=len(src) if isinstance(src, str) else 0,
        version=version if type(version) in (int, str, type(None)) else None,
    )


_TABLE_NAMES: dict[tuple[str, str], str] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): "persistent",
    ("dnnlib.util", "EasyDict"): "easydict",
    ("dnnlib", "EasyDict"): "easydict",
    ("collections", "OrderedDict"): "ordereddict",
    ("torch._utils", "_rebuild_tensor_v2"): "tensor",
    ("torch._utils", "_rebuild_parameter"): "parameter",
    ("torch.storage", "_load_from_bytes"): "storage",
    ("numpy", "dtype"): "dtype",
    ("numpy.core.multiarray", "scalar"): "scalar",
    ("numpy._core.multiarray", "scalar"): "scalar",
    ("_codecs", "encode"): "encode",
    ("builtins", "set"): "set",
    ("builtins", "frozenset"): "frozenset",
    ("__builtin__", "set"): "set",  # protocol-2 pickles name builtins the Python 2 way
    ("__builtin__", "frozenset"): "frozenset",
}

#: (module, name) pairs a StyleGAN2-ADA pickle may reference; each resolves to a fresh handle of the loader's own.
ALLOWED_GLOBALS = tuple(sorted(_TABLE_NAMES))

_D = pickle._Unpickler.dispatch  # type: ignore[attr-defined]


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler that resolves only :data:`ALLOWED_GLOBALS` and treats the pickle as data.

    Compared with :class:`pickle.Unpickler`: GLOBAL yields a :class:`_Global` handle (REDUCE/NEWOBJ/OBJ/INST
    call only such handles), BUILD is accepted only on an EasyDict or a numpy dtype record, APPEND/SETITEM/
    ADDITEMS only on plain lists/dicts/sets, extension codes and persistent ids are refused, tuples are
    nested at most :data:`MAX_NESTING` deep (hashing deeper ones would overflow the C stack), and the total
    bytes of rebuilt tensors is capped by ``max_tensor_bytes``.
    """

    dispatch = dict(_D)

    def __init__(self, file: Any, source: str = "<pickle>", max_tensor_bytes: Optional[int] = None) -> None:
        super().__init__(file, fix_imports=False)
        self._source = source
        self._tensor_bytes_left = max_tensor_bytes if max_tensor_bytes is not None else 1 << 40
        self._depth: dict[int, tuple[int, Any]] = {}  # id -> (nesting depth, the tuple/frozenset kept alive)
        makers: dict[str, tuple[Callable[..., Any], bool]] = {
            "persistent": (lambda meta: _reconstruct_persistent_record(meta, self._source), False),
            "easydict": (self._easydict, True),
            "ordereddict": (self._ordereddict, False),
            "tensor": (self._rebuild_tensor, False),
            "parameter": (self._rebuild_parameter, False),
            "storage": (self._load_storage, False),
            "dtype": (self._numpy_dtype, False),
            "scalar": (self._numpy_scalar, False),
            "encode": (lambda text, encoding="utf-8": _codecs_encode(text, encoding, self._source), False),
            "set": (lambda *a: set(self._items(a, "set")), False),
            "frozenset": (lambda *a: self._track(frozenset(self._items(a, "frozenset"))), False),
        }
        self._table = {key: _Global(f"{key[0]}.{key[1]}", *makers[kind]) for key, kind in _TABLE_NAMES.items()}

    # ------------------------------------------------------------------ errors
    def _unsafe(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self._source}: {what} (refused; nothing from the file was executed).")

    def _corrupt(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self._source}: {what}; the file is not a valid StyleGAN2-ADA pickle.")

    # ------------------------------------------------------------------ globals and calls
    def find_class(self, module: str, name: str) -> Any:
        handle = self._table.get((module, name))
        if handle is None:
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to load global '{str(module)[:100]}.{str(name)[:100]}': it is not on the "
                f"allow-list of lightning_gi's StyleGAN2-ADA loader (nothing from the file was executed). If this is a "
                f"genuine official pickle, please report the name."
            )
        return handle

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self._source}: persistent ids are not expected in a StyleGAN2-ADA pickle")

    def _call(self, func: Any, args: Any, newobj: bool = False) -> Any:
        if not isinstance(func, _Global):
            raise self._unsafe(f"the pickle calls a {type(func).__name__} object, which is not one of the loader's allowed globals")
        if newobj and not func.newobj:
            raise self._unsafe(f"NEWOBJ on {func.name}")
        if type(args) is not tuple:
            raise self._corrupt(f"the arguments of {func.name} are a {type(args).__name__}, not a tuple")
        try:
            return func.call(*args)
        except CorruptCheckpointError:
            raise
        except TypeError as err:
            raise self._corrupt(f"{func.name} got unexpected arguments ({str(err)[:120]})") from None

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, newobj=True))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise self._unsafe("NEWOBJ_EX with keyword arguments")
        self.append(self._call(cls, args, newobj=True))

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST / OBJ
        self.append(self._call(klass, tuple(args)))

    def load_ext(self) -> None:
        raise self._unsafe("pickle extension codes (EXT1/EXT2/EXT4)")

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is AttrDict:
            inst._apply_state(state, self._source)
        elif type(inst) is _DtypeSpec:
            inst.apply_state(state, self._source)
        else:
            raise self._unsafe(f"BUILD (a state change) on a {type(inst).__name__} object")

    # ------------------------------------------------------------------ containers
    def _track(self, obj: Any) -> Any:
        """Record the nesting depth of a new tuple/frozenset; refuse deeper than :data:`MAX_NESTING`."""
        depth = 1
        for item in obj:
            entry = self._depth.get(id(item)) if type(item) in (tuple, frozenset) else None
            if entry is not None and entry[1] is item and entry[0] >= depth:
                depth = entry[0] + 1
        if depth > MAX_NESTING:
            raise self._corrupt(f"tuples are nested more than {MAX_NESTING} levels deep")
        self._depth[id(obj)] = (depth, obj)
        return obj

    def _items(self, args: tuple, what: str) -> list:
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple, set, frozenset)):
            raise self._corrupt(f"a {what} record has unexpected arguments")
        return list(args[0]) if args else []

    def load_tuple(self) -> None:
        items = self.pop_mark()  # (pop_mark rebinds self.append: call it first)
        self.append(self._track(tuple(items)))

    def load_tuple1(self) -> None:
        self.stack[-1] = self._track((self.stack[-1],))

    def load_tuple2(self) -> None:
        self.stack[-2:] = [self._track((self.stack[-2], self.stack[-1]))]

    def load_tuple3(self) -> None:
        self.stack[-3:] = [self._track((self.stack[-3], self.stack[-2], self.stack[-1]))]

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        self.append(self._track(frozenset(items)))

    def load_append(self) -> None:
        value = self.stack.pop()
        self._container(list, "APPEND").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._container(list, "APPENDS").extend(items)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._container(_DICT_TYPES, "SETITEM")[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._container(_DICT_TYPES, "SETITEMS")
        if len(items) % 2:
            raise self._corrupt("SETITEMS has an odd number of items")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._container(set, "ADDITEMS").update(items)

    def _container(self, types: Any, op: str) -> Any:
        if not self.stack:
            raise self._corrupt(f"{op} on an empty stack")
        target = self.stack[-1]
        if type(target) not in (types if isinstance(types, tuple) else (types,)):
            raise self._unsafe(f"{op} on a {type(target).__name__} object")
        return target

    # ------------------------------------------------------------------ the allowed globals, as our own code
    def _easydict(self, *args: Any) -> AttrDict:
        if args and (len(args) > 1 or type(args[0]) not in _DICT_TYPES + (list, tuple)):
            raise self._corrupt("an EasyDict record has unexpected arguments")
        return AttrDict(*args)

    def _ordereddict(self, *args: Any) -> collections.OrderedDict:
        if args and (len(args) > 1 or type(args[0]) not in _DICT_TYPES + (list, tuple)):
            raise self._corrupt("an OrderedDict record has unexpected arguments")
        return collections.OrderedDict(*args)

    def _load_storage(self, data: Any) -> _StorageRef:
        """Replaces ``torch.storage._load_from_bytes`` (weights_only=False) by a weights_only load, type-checked."""
        if type(data) not in (bytes, bytearray):
            raise self._unsafe("a tensor storage record that is not bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TypedStorage deprecation
                obj = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except Exception as err:
            raise self._corrupt(f"a tensor storage record cannot be read ({type(err).__name__})") from None
        if isinstance(obj, torch.storage.TypedStorage):
            untyped, dtype = obj._untyped_storage, obj.dtype
        elif type(obj) in (Tensor, nn.Parameter):
            self._check_tensor(obj, "a tensor storage record")
            flat = obj.detach().reshape(-1).clone()
            untyped, dtype = flat.untyped_storage(), flat.dtype
        else:
            raise self._unsafe(f"a tensor storage record that loads as a {type(obj).__name__}, not a storage or a dense tensor")
        if type(untyped) is not torch.UntypedStorage or untyped.device.type != "cpu" or dtype not in ALLOWED_TENSOR_DTYPES:
            raise self._unsafe(f"a tensor storage of dtype {dtype} on {untyped.device}")
        size = torch.empty((), dtype=dtype).element_size()
        if untyped.nbytes() % size:
            raise self._corrupt("a tensor storage's size is not a whole number of elements")
        return _StorageRef(untyped, dtype, untyped.nbytes() // size)

    def _check_tensor(self, t: Any, what: str) -> None:
        if type(t) not in (Tensor, nn.Parameter) or t.layout != torch.strided or t.device.type != "cpu" or t.dtype not in ALLOWED_TENSOR_DTYPES:
            raise self._unsafe(f"{what} is not a dense CPU tensor of an allowed dtype")

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> Tensor:
        """Replaces ``torch._utils._rebuild_tensor_v2``: a view into a storage read by :meth:`_load_storage`."""
        if not isinstance(storage, _StorageRef):
            raise self._unsafe("a tensor record whose storage was not loaded by this loader")
        if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride) or len(size) > MAX_TENSOR_DIMS:
            raise self._corrupt("a tensor record has malformed size/stride")
        offset = _as_int(storage_offset, "a tensor's storage offset", self._source)
        for v in size + stride:
            if _as_int(v, "a tensor size/stride", self._source) < 0:
                raise self._corrupt("a tensor record has a negative size or stride")
        if offset < 0:
            raise self._corrupt("a tensor record has a negative storage offset")
        numel = math.prod(size)
        if numel and (numel > storage.numel or offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel):
            raise self._corrupt("a tensor record reaches past the end of its storage")
        if type(requires_grad) is not bool:
            raise self._corrupt("a tensor record's requires_grad is not a boolean")
        if backward_hooks is not None and (type(backward_hooks) not in _DICT_TYPES or backward_hooks):
            raise self._unsafe("a tensor record with backward hooks")
        if metadata is not None and (type(metadata) not in _DICT_TYPES or metadata):
            raise self._unsafe("a tensor record with metadata (conj/neg bits or other flags)")
        self._tensor_bytes_left -= numel * torch.empty((), dtype=storage.dtype).element_size()
        if self._tensor_bytes_left < 0:
            raise self._corrupt("its tensors reference more data than the file holds")
        t = torch.empty((0,), dtype=storage.dtype).set_(storage.untyped, offset, size, stride)
        if requires_grad and t.is_floating_point():
            t.requires_grad_(True)
        return t

    def _rebuild_parameter(self, data: Any, requires_grad: Any = True, backward_hooks: Any = None) -> nn.Parameter:
        """Replaces ``torch._utils._rebuild_parameter``: wraps a tensor this loader rebuilt."""
        self._check_tensor(data, "a parameter record's data")
        if type(requires_grad) is not bool:
            raise self._corrupt("a parameter record's requires_grad is not a boolean")
        if backward_hooks is not None and (type(backward_hooks) not in _DICT_TYPES or backward_hooks):
            raise self._unsafe("a parameter record with backward hooks")
        return nn.Parameter(data.detach(), requires_grad=requires_grad and data.is_floating_point())

    def _numpy_dtype(self, obj: Any, align: Any = False, copy: Any = True) -> _DtypeSpec:
        """Replaces ``numpy.dtype``: builtin numeric types named by a short string only."""
        import numpy as np

        if type(obj) is not str or len(obj) > 8 or type(align) is not bool or type(copy) is not bool:
            raise self._unsafe("a numpy dtype record that does not name a builtin numeric type")
        try:
            dt = np.dtype(obj)
        except TypeError:
            raise self._corrupt(f"unknown numpy dtype {obj!r}") from None
        _check_numpy_dtype(dt, self._source)
        return _DtypeSpec(dt)

    def _numpy_scalar(self, spec: Any, data: Any = None) -> Any:
        """Replaces ``numpy.core.multiarray.scalar``: returns the Python number (dtype re-validated here)."""
        import numpy as np

        if not isinstance(spec, _DtypeSpec):
            raise self._unsafe("a numpy scalar record without a dtype made by this loader")
        _check_numpy_dtype(spec.dtype, self._source)
        if type(data) not in (bytes, bytearray) or len(data) != spec.dtype.itemsize:
            raise self._corrupt("a numpy scalar record's data does not match its dtype's size")
        return np.frombuffer(bytes(data), dtype=spec.dtype, count=1)[0].item()


for _op, _fn in (
    (pickle.REDUCE, RestrictedUnpickler.load_reduce),
    (pickle.NEWOBJ, RestrictedUnpickler.load_newobj),
    (pickle.NEWOBJ_EX, RestrictedUnpickler.load_newobj_ex),
    (pickle.BUILD, RestrictedUnpickler.load_build),
    (pickle.EXT1, RestrictedUnpickler.load_ext),
    (pickle.EXT2, RestrictedUnpickler.load_ext),
    (pickle.EXT4, RestrictedUnpickler.load_ext),
    (pickle.TUPLE, RestrictedUnpickler.load_tuple),
    (pickle.TUPLE1, RestrictedUnpickler.load_tuple1),
    (pickle.TUPLE2, RestrictedUnpickler.load_tuple2),
    (pickle.TUPLE3, RestrictedUnpickler.load_tuple3),
    (pickle.FROZENSET, RestrictedUnpickler.load_frozenset),
    (pickle.APPEND, RestrictedUnpickler.load_append),
    (pickle.APPENDS, RestrictedUnpickler.load_appends),
    (pickle.SETITEM, RestrictedUnpickler.load_setitem),
    (pickle.SETITEMS, RestrictedUnpickler.load_setitems),
    (pickle.ADDITEMS, RestrictedUnpickler.load_additems),
):
    RestrictedUnpickler.dispatch[_op[0]] = _fn
del _op, _fn


def _check_loaded(obj: Any, source: str, max_tree_bytes: Optional[int] = None) -> None:
    """Walk the loaded data iteratively: only data types, no cycles, at most MAX_NESTING deep / MAX_TREE_NODES big,
    and at most ``max_tree_bytes`` of tensor data when every reference to a tensor is counted (what consumers
    that copy each reference, like :func:`record_state_dict`, would allocate)."""

    def children(o: Any) -> Any:
        if type(o) in _DICT_TYPES:
            return [*o.keys(), *o.values()]
        if type(o) is PersistentRecord:
            return [o.state, o.extra]
        return list(o)

    containers = _DICT_TYPES + (list, tuple, set, frozenset, PersistentRecord)
    done: dict[int, tuple[int, int, int]] = {}  # id -> (height, tree size, tree tensor bytes)
    limit = max_tree_bytes if max_tree_bytes is not None else 1 << 62
    on_path: set[int] = set()
    keep: list[Any] = []
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        o, finished = stack.pop()
        if type(o) not in containers:
            if type(o) in (Tensor, nn.Parameter):
                if o.layout != torch.strided or o.device.type != "cpu" or o.dtype not in ALLOWED_TENSOR_DTYPES:
                    raise UnsafeCheckpointError(f"{source}: the pickle holds a tensor that is not a dense CPU tensor of an allowed dtype")
            elif type(o) not in _LEAF_TYPES:
                raise UnsafeCheckpointError(f"{source}: the pickle leaves a {type(o).__name__} object in its data (only plain data, tensors and network records are accepted)")
            continue
        i = id(o)
        if finished:
            height, size, nbytes = 1, 1, 0
            for c in children(o):
                if type(c) in containers:
                    h, s, b = done[id(c)]
                else:
                    h, s, b = 0, 1, (c.numel() * c.element_size() if isinstance(c, Tensor) else 0)
                height, size, nbytes = max(height, h + 1), size + s, nbytes + b
            on_path.discard(i)
            if nbytes > limit:
                raise CorruptCheckpointError(f"{source}: its data references more tensor bytes than the file holds (the same tensor reused many times); the file is not a valid StyleGAN2-ADA pickle.")
            if height > MAX_NESTING:
                raise CorruptCheckpointError(f"{source}: its data is nested more than {MAX_NESTING} levels deep; the file is not a valid StyleGAN2-ADA pickle.")
            if size > MAX_TREE_NODES:
                raise CorruptCheckpointError(f"{source}: its data holds more than {MAX_TREE_NODES} objects when shared references are followed; the file is not a valid StyleGAN2-ADA pickle.")
            done[i] = (height, size, nbytes)
            continue
        if i in done:
            continue
        if i in on_path:
            raise CorruptCheckpointError(f"{source}: its data contains a reference cycle (an object inside itself); the file is not a valid StyleGAN2-ADA pickle.")
        on_path.add(i)
        keep.append(o)
        stack.append((o, True))
        stack.extend((c, False) for c in children(o))


def load_official_pickle(path: str | os.PathLike, what: str = "StyleGAN2-ADA pickle") -> Any:
    """Unpickle an official ``.pkl`` with :class:`RestrictedUnpickler` (networks become :class:`PersistentRecord`).

    Raises :class:`UnsafeCheckpointError` for anything outside the allow-list and
    :class:`~lightning_gi.checkpoints.CorruptCheckpointError` for anything malformed, in one sentence each.
    """
    path = resolve_checkpoint(path, what)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f, source=str(path), max_tensor_bytes=2 * size + (1 << 20)).load()
        _check_loaded(data, str(path), max_tree_bytes=4 * size + (64 << 20))
        return data
    except CorruptCheckpointError:
        raise
    except Exception as err:  # truncated file, bad opcode, wrong format
        reason = "it ends early" if isinstance(err, EOFError) else f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        raise CorruptCheckpointError(
            f"{what}: cannot read '{path}' ({reason}); the file is corrupt, truncated or "
            f"not an official StyleGAN2-ADA pickle. See {CHECKPOINTS_README}."
        ) from None


def record_state_dict(record: PersistentRecord, prefix: str = "") -> dict[str, Tensor]:
    """Flatten a record tree into a ``state_dict`` (``_parameters`` and ``_buffers``, recursively).

    The tree's depth is bounded by :func:`load_official_pickle`'s checks (:data:`MAX_NESTING`).
    """
    out: dict[str, Tensor] = {}
    state = record.state
    for group in ("_parameters", "_buffers"):
        entries = state.get(group) or {}
        if not isinstance(entries, Mapping):
            raise CorruptCheckpointError(f"record {record.class_name}: {group} is a {type(entries).__name__}, not a dict")
        for name, value in entries.items():
            if value is None:
                continue
            if not isinstance(name, str) or not isinstance(value, Tensor):
                raise CorruptCheckpointError(f"record {record.class_name}: {group} entry {str(name)[:80]!r} is not a named tensor")
            out[prefix + name] = value.detach().clone()
    non_persistent = state.get("_non_persistent_buffers_set") or ()
    if not isinstance(non_persistent, (set, frozenset, list, tuple)):
        raise CorruptCheckpointError(f"record {record.class_name}: _non_persistent_buffers_set is not a set")
    for name in non_persistent:
        if isinstance(name, str):
            out.pop(prefix + name, None)
    modules = state.get("_modules") or {}
    if not isinstance(modules, Mapping):
        raise CorruptCheckpointError(f"record {record.class_name}: _modules is a {type(modules).__name__}, not a dict")
    for name, child in modules.items():
        if child is None:
            continue
        if not isinstance(name, str) or not isinstance(child, PersistentRecord):
            raise CorruptCheckpointError(f"record {record.class_name}: sub-module {str(name)[:80]!r} is not a persistent record")
        out.update(record_state_dict(child, prefix=f"{prefix}{name}."))
    return out


def _check_generator_kwargs(kwargs: Mapping[str, Any], source: str) -> None:
    """Bound a StyleGAN2 generator's architecture arguments (:data:`GENERATOR_LIMITS`) before any allocation."""

    def bad(msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{source}: {msg}; refusing to build the generator (see {CHECKPOINTS_README}).")

    def integer(key: str, value: Any, optional: bool = False) -> Optional[int]:
        if value is None and optional:
            return None
        lo, hi = GENERATOR_LIMITS[key]
        if type(value) is not int or not lo <= value <= hi:
            raise bad(f"generator argument {key} must be an integer in [{lo}, {hi}], got {str(value)[:40]}")
        return value

    def number(key: str, value: Any, lo: float, hi: float, optional: bool = False) -> None:
        if value is None and optional:
            return
        if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
            raise bad(f"generator argument {key} must be a number in [{lo}, {hi}], got {str(value)[:40]}")

    z_dim = integer("z_dim", kwargs.get("z_dim", 512))
    c_dim = integer("c_dim", kwargs.get("c_dim", 0))
    w_dim = integer("w_dim", kwargs.get("w_dim", 512))
    res = integer("img_resolution", kwargs.get("img_resolution", 64))
    if res & (res - 1):
        raise bad(f"img_resolution must be a power of two, got {res}")
    img_channels = integer("img_channels", kwargs.get("img_channels", 3))
    mapping, synthesis = kwargs.get("mapping_kwargs") or {}, kwargs.get("synthesis_kwargs") or {}
    if not isinstance(mapping, Mapping) or not isinstance(synthesis, Mapping):
        raise bad("mapping_kwargs/synthesis_kwargs must be dicts")
    num_layers = integer("mapping.num_layers", mapping.get("num_layers", 8))
    embed = integer("mapping.embed_features", mapping.get("embed_features"), optional=True) or w_dim
    layer = integer("mapping.layer_features", mapping.get("layer_features"), optional=True) or w_dim
    number("mapping.lr_multiplier", mapping.get("lr_multiplier", 0.01), 1e-8, 1e4)
    number("mapping.w_avg_beta", mapping.get("w_avg_beta", 0.995), 0.0, 1.0, optional=True)
    base = integer("synthesis.channel_base", synthesis.get("channel_base", 32768))
    cmax = integer("synthesis.channel_max", synthesis.get("channel_max", 512))
    integer("synthesis.num_fp16_res", synthesis.get("num_fp16_res", 0))
    number("synthesis.conv_clamp", synthesis.get("conv_clamp"), 1e-6, 1e6, optional=True)
    # parameters of the networks about to be built (StyleGAN2-ADA layout), before allocating them
    params, prev, r = 0, 0, 4
    while r <= res:
        ch = min(base // r, cmax)
        params += ch * r * r if r == 4 else (w_dim + 9 * ch + 1) * prev + ch  # const, or conv0 (affine + weight)
        params += (w_dim + 9 * ch + 1) * ch + ch + r * r  # conv1 (affine + weight + bias, noise)
        params += (w_dim + 1) * ch + (ch + 1) * img_channels  # toRGB
        prev, r = ch, r * 2
    features = [z_dim + (embed if c_dim else 0)] + [layer] * (num_layers - 1) + [w_dim]
    params += sum((a + 1) * b for a, b in zip(features, features[1:])) + c_dim * embed
    if params > MAX_GENERATOR_PARAMS:
        raise bad(f"its architecture arguments describe a generator of about {params / 1e6:.0f}M parameters (limit {MAX_GENERATOR_PARAMS // 1_000_000}M)")


def load_stylegan2_pkl(path: str | os.PathLike, key: str = "G_ema", **overrides: Any) -> nn.Module:
    """Build a :class:`~lightning_gi.generators.stylegan2.StyleGAN2Generator` from an official pickle.

    ``key`` picks the network (``"G_ema"``, the averaged generator used for sampling, or ``"G"``). The
    architecture comes from the record's ``_init_kwargs`` (``overrides`` replace entries) and is bounded by
    :data:`GENERATOR_LIMITS` before construction; the tensors are loaded strictly after :func:`filter_state_dict`.
    """
    from .stylegan2 import StyleGAN2Generator

    data = load_official_pickle(path)
    if isinstance(data, PersistentRecord):
        record = data
    elif isinstance(data, Mapping):
        if key not in data:
            raise CorruptCheckpointError(f"'{path}' has no network '{key}' (keys: {sorted(str(k)[:40] for k in data)[:20]})")
        record = data[key]
    else:
        raise CorruptCheckpointError(f"'{path}' does not hold a dict of networks (got {type(data).__name__})")
    if not isinstance(record, PersistentRecord):
        raise CorruptCheckpointError(f"'{path}': '{key}' is not a persistent network record")
    if record.class_name != "Generator":
        raise CorruptCheckpointError(f"'{path}': '{key}' is a {record.class_name[:80]}, not a StyleGAN2 Generator")
    kwargs = record.init_kwargs
    kwargs.update(overrides)
    allowed = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise CorruptCheckpointError(f"'{path}': unexpected generator arguments {[u[:40] for u in unknown[:10]]}")
    _check_generator_kwargs(kwargs, f"'{path}'")
    try:
        model = StyleGAN2Generator(**kwargs)
    except Exception as err:
        raise CorruptCheckpointError(f"'{path}': cannot build a StyleGAN2 generator from its _init_kwargs {str(kwargs)[:300]}: {str(err)[:200]}") from None
    state = filter_state_dict(record_state_dict(record), model, source=str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CorruptCheckpointError(f"'{path}': its tensors do not load into the generator ({str(err)[:200]})") from None
    return model


def filter_state_dict(
    state_dict: Mapping[str, Tensor],
    model: nn.Module,
    source: str = "checkpoint",
    strip_prefixes: tuple[str, ...] = STRIP_PREFIXES,
    rename: Optional[Callable[[str], Optional[str]]] = None,
) -> dict[str, Tensor]:
    """timm-style checkpoint filter: map names onto ``model``'s and check every shape.

    * ``rename(name) -> new name or None`` (drop) is applied first when given;
    * when the names do not match directly, the first prefix in ``strip_prefixes`` under which the model's
      keys are found is stripped (keys without it are dropped: e.g. a Lightning checkpoint of an attack holds
      ``generator.*`` next to other tensors);
    * missing, unexpected or mis-shaped tensors raise :class:`CorruptCheckpointError` naming them.
    """
    target = model.state_dict()
    sd = dict(state_dict)
    if rename is not None:
        sd = {new: v for k, v in sd.items() if (new := rename(k)) is not None}
    if not set(target) <= set(sd):
        for prefix in strip_prefixes:
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if sub and len(set(target) & set(sub)) > len(set(target) & set(sd)):
                sd = sub
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched:
        def head(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        parts = []
        if mismatched:
            parts.append(f"shape mismatches: {head(mismatched)}")
        if missing:
            parts.append(f"missing: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected: {head(unexpected)}")
        raise CorruptCheckpointError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(parts)
            + f". Check the generator variant/arguments against the file (see {CHECKPOINTS_README})."
        )
    return {k: sd[k].to(dtype=target[k].dtype) if sd[k].is_floating_point() else sd[k] for k in target}


def read_generator_file(path: str | os.PathLike, what: str = "generator checkpoint") -> tuple[dict[str, Tensor], Optional[dict[str, Any]]]:
    """(state dict, embedded generator spec or None) of a ``.pt``/``.ckpt``/``.safetensors`` file (no code run).

    Files written by :func:`lightning_gi.generators.registry.save_generator` hold ``{"state_dict": ...,
    "generator": {"name": ..., "kwargs": {...}}}``; the spec tells which architecture to build.
    """
    resolved = resolve_checkpoint(path, what)
    spec = None
    if resolved.suffix != ".safetensors":
        try:
            raw = torch.load(str(resolved), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CorruptCheckpointError(
                f"{what}: cannot read '{resolved}' ({type(err).__name__}: {err}); the file is corrupt, truncated "
                f"or not a weights-only checkpoint. See {CHECKPOINTS_README}."
            ) from None
        if isinstance(raw, dict) and isinstance(raw.get("generator"), dict):
            spec = raw["generator"]
    return load_state_dict_file(resolved, what), spec


def load_generator_state(model: nn.Module, path: str | os.PathLike, what: str = "generator checkpoint") -> nn.Module:
    """Load a plain state dict / Lightning checkpoint / safetensors file into ``model`` (filtered, strict)."""
    resolved = resolve_checkpoint(path, what)
    if Path(resolved).suffix == ".pkl":
        raise CorruptCheckpointError(f"'{resolved}' is a pickle: use load_stylegan2_pkl (official StyleGAN2-ADA files only)")
    sd = load_state_dict_file(resolved, what)
    model.load_state_dict(filter_state_dict(sd, model, source=f"'{resolved}'"), strict=True)
    return model
