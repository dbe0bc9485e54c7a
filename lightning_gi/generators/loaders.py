"""Loading generator checkpoints without executing code from them.

Three sources:

* NVIDIA's official StyleGAN2-ADA ``.pkl`` (a pickle of ``{"G", "D", "G_ema", "augment_pipe",
  "training_set_kwargs"}``). Each network in it is a *persistent class* record: normal unpickling calls
  ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, which EXECUTES the network source code
  embedded in ``meta["module_src"]``. :class:`RestrictedUnpickler` never imports anything outside a short
  allow-list (:data:`ALLOWED_GLOBALS`); the persistence reconstructor is replaced by a function that only
  returns a :class:`PersistentRecord` (class name + the module's state: ``_parameters``, ``_buffers``,
  ``_modules``, ``_init_kwargs``), tensors are rebuilt through ``torch.load(..., weights_only=True)``, and
  any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises
  :class:`UnsafeCheckpointError` before it is resolved. The embedded source is never compiled or run.
* plain state dicts (``.pt`` / ``.pth`` / Lightning ``.ckpt``, read with ``weights_only=True``);
* ``.safetensors``.

Whatever the source, :func:`filter_state_dict` maps names to the model's (strips ``generator.``, ``G_ema.``,
``module.`` ... prefixes) and checks shapes, raising :class:`~lightning_gi.checkpoints.CorruptCheckpointError`
that names the file and lists missing / unexpected / mismatched tensors.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
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
    "load_official_pickle",
    "record_state_dict",
    "load_stylegan2_pkl",
    "filter_state_dict",
    "load_generator_state",
    "read_generator_file",
]

STRIP_PREFIXES = ("generator.", "G_ema.", "G.", "module.", "_orig_mod.", "model.")


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint asks to import or call something outside the loader's allow-list (refused, not run)."""


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
    """EasyDict/OrderedDict/numpy scalars -> plain Python containers and numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj) if isinstance(obj, list) else tuple(_plain(v) for v in obj)
    if hasattr(obj, "item") and not isinstance(obj, Tensor) and getattr(obj, "shape", None) == ():
        return obj.item()
    return obj


def _reconstruct_persistent_record(meta: Any) -> PersistentRecord:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: returns the record's data only."""
    if not isinstance(meta, Mapping) or meta.get("type") != "class" or not isinstance(meta.get("state"), Mapping):
        raise UnsafeCheckpointError("malformed persistent-class record in the pickle (expected type='class' with a state dict)")
    src = meta.get("module_src")
    return PersistentRecord(
        class_name=str(meta.get("class_name")),
        state=dict(meta["state"]),
        module_src_chars=len(src) if isinstance(src, str) else 0,
        version=meta.get("version"),
    )


class AttrDict(dict):
    """Replaces ``dnnlib.util.EasyDict`` (a dict subclass): a plain dict that tolerates pickle's BUILD."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, Mapping):
            self.update(state)


def _load_storage_from_bytes(data: bytes) -> Any:
    """Replaces ``torch.storage._load_from_bytes`` (which uses weights_only=False) by a weights_only load."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError("tensor storage record is not bytes")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


def _numpy_dtype(*args: Any) -> Any:
    import numpy as np

    dt = np.dtype(*args)
    if dt.hasobject:
        raise UnsafeCheckpointError("numpy object dtype in the pickle is refused")
    return dt


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError("numpy scalar record with an object dtype or non-bytes data is refused")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError("unexpected _codecs.encode record")
    return text.encode(encoding)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import torch._utils as tu

    table: dict[tuple[str, str], Any] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_record,
        ("dnnlib.util", "EasyDict"): AttrDict,
        ("dnnlib", "EasyDict"): AttrDict,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): tu._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): tu._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("numpy", "dtype"): _numpy_dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set,  # protocol-2 pickles name builtins the Python 2 way
        ("__builtin__", "frozenset"): frozenset,
    }
    return table


#: (module, name) pairs a StyleGAN2-ADA pickle may reference, mapped to what we use instead.
ALLOWED_GLOBALS = tuple(sorted(_allowed_globals()))


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; everything else raises before import."""

    def __init__(self, file: Any, source: str = "<pickle>") -> None:
        super().__init__(file)
        self._table = _allowed_globals()
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._table[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to load global '{module}.{name}': it is not on the allow-list of "
                f"lightning_gi's StyleGAN2-ADA loader (nothing from the file was executed). If this is a "
                f"genuine official pickle, please report the name."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self._source}: persistent ids are not expected in a StyleGAN2-ADA pickle")


def load_official_pickle(path: str | os.PathLike, what: str = "StyleGAN2-ADA pickle") -> Any:
    """Unpickle an official ``.pkl`` with :class:`RestrictedUnpickler` (networks become :class:`PersistentRecord`)."""
    path = resolve_checkpoint(path, what)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, source=str(path)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated file, bad opcode, wrong format
        raise CorruptCheckpointError(
            f"{what}: cannot read '{path}' ({type(err).__name__}: {err}); the file is corrupt, truncated or not "
            f"an official StyleGAN2-ADA pickle. See {CHECKPOINTS_README}."
        ) from None


def record_state_dict(record: PersistentRecord, prefix: str = "") -> dict[str, Tensor]:
    """Flatten a record tree into a ``state_dict`` (``_parameters`` and ``_buffers``, recursively)."""
    out: dict[str, Tensor] = {}
    state = record.state
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise CorruptCheckpointError(f"record {record.class_name}: {group} entry '{name}' is not a tensor")
            out[prefix + name] = value.detach().clone()
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for name in non_persistent:
        out.pop(prefix + name, None)
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise CorruptCheckpointError(f"record {record.class_name}: sub-module '{name}' is not a persistent record")
        out.update(record_state_dict(child, prefix=f"{prefix}{name}."))
    return out


def load_stylegan2_pkl(path: str | os.PathLike, key: str = "G_ema", **overrides: Any) -> nn.Module:
    """Build a :class:`~lightning_gi.generators.stylegan2.StyleGAN2Generator` from an official pickle.

    ``key`` picks the network (``"G_ema"``, the averaged generator used for sampling, or ``"G"``). The
    architecture comes from the record's ``_init_kwargs`` (``overrides`` replace entries); the tensors are
    loaded strictly after :func:`filter_state_dict`.
    """
    from .stylegan2 import StyleGAN2Generator

    data = load_official_pickle(path)
    if isinstance(data, PersistentRecord):
        record = data
    elif isinstance(data, Mapping):
        if key not in data:
            raise CorruptCheckpointError(f"'{path}' has no network '{key}' (keys: {sorted(map(str, data))})")
        record = data[key]
    else:
        raise CorruptCheckpointError(f"'{path}' does not hold a dict of networks (got {type(data).__name__})")
    if not isinstance(record, PersistentRecord):
        raise CorruptCheckpointError(f"'{path}': '{key}' is not a persistent network record")
    if record.class_name != "Generator":
        raise CorruptCheckpointError(f"'{path}': '{key}' is a {record.class_name}, not a StyleGAN2 Generator")
    kwargs = record.init_kwargs
    kwargs.update(overrides)
    allowed = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise CorruptCheckpointError(f"'{path}': unexpected generator arguments {unknown}")
    try:
        model = StyleGAN2Generator(**kwargs)
    except (TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"'{path}': cannot build a StyleGAN2 generator from its _init_kwargs {kwargs}: {err}") from None
    state = filter_state_dict(record_state_dict(record), model, source=str(path))
    model.load_state_dict(state, strict=True)
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
