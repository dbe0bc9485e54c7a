"""Atomic file writes: a reader (or a run resumed after a crash) sees either the old file or the complete new one.

Every file the package writes that a later step reads back (observations, reconstructions, Lightning
checkpoints, generator weights) goes through :func:`write_atomic`: the bytes land in a hidden temporary file
in the same directory (``.<name>.partial-<pid>``), are flushed to disk, and ``os.replace`` puts them in place.
Light on purpose (no torch import at module level beyond :func:`save_atomic`'s): observation files are written
from users' own FL stacks.
"""
from __future__ import annotations

import io
import os
from typing import Any

PARTIAL_MARK = ".partial-"
"""Part of a temporary file's name while it is being written (never a finished file)."""


def write_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync, and ``os.replace``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}{PARTIAL_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`write_atomic`)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(buffer.getvalue(), path)


__all__ = ["PARTIAL_MARK", "save_atomic", "write_atomic"]
