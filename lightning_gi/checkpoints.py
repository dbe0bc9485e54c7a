"""Where pretrained files live and how the code finds them (see checkpoints/README.md).

Nothing is ever downloaded: a missing file is an error that names the file and where to put it.
Search order for a bare file name: the directory in ``$LIGHTNING_GI_CHECKPOINTS``, ``./checkpoints``,
the ``checkpoints/`` directory of this source tree, then torch hub's cache (``$TORCH_HOME/hub/checkpoints``).
A path with a directory part (``checkpoints/x.pt``, ``/abs/x.pt``) is taken as given, never searched.

:func:`resolve_checkpoint` is the one place that turns a name or path into a file: to read it
(``if_missing="raise"``, the default, or ``"none"``) or to write it (``"destination"``: the first directory
searched, so the search above finds the new file first).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, overload

import torch

CHECKPOINTS_README = "checkpoints/README.md"

IfMissing = Literal["raise", "none", "destination"]


class MissingCheckpointError(FileNotFoundError):
    """A pretrained file the run needs is not on disk."""


class CorruptCheckpointError(RuntimeError):
    """A pretrained file exists but cannot be read or does not fit the model."""


def checkpoint_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("LIGHTNING_GI_CHECKPOINTS")
    if env:
        dirs.append(Path(env))
    dirs.append(Path.cwd() / "checkpoints")
    dirs.append(Path(__file__).resolve().parent.parent / "checkpoints")
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    seen, unique = set(), []
    for d in dirs:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def _is_bare_name(p: Path) -> bool:
    return not p.is_absolute() and len(p.parts) == 1


def find_checkpoint(name_or_path: str | os.PathLike) -> Optional[Path]:
    """Return the existing path for an explicit path or a bare file name, else None
    (``resolve_checkpoint(name_or_path, if_missing="none")``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if not _is_bare_name(p):
        return None
    for d in checkpoint_dirs():
        cand = d / p.name
        if cand.is_file():
            return cand
    return None


@overload
def resolve_checkpoint(name_or_path: str | os.PathLike, what: str = ..., *, if_missing: Literal["raise", "destination"] = ...) -> Path: ...
@overload
def resolve_checkpoint(name_or_path: str | os.PathLike, what: str = ..., *, if_missing: Literal["none"]) -> Optional[Path]: ...


def resolve_checkpoint(name_or_path: str | os.PathLike, what: str = "pretrained weights", *, if_missing: IfMissing = "raise") -> Optional[Path]:
    """The file for an explicit path or a bare file name (searched as in the module docs).

    When no such file exists: ``if_missing="raise"`` raises :class:`MissingCheckpointError` naming the file,
    the directories searched and ``what`` (what the file is for); ``"none"`` returns None.

    ``if_missing="destination"`` returns where to WRITE the file, whether or not one exists: an explicit path as
    given, a bare name in the first directory searched (``$LIGHTNING_GI_CHECKPOINTS`` when set, else
    ``./checkpoints``), so that a later lookup finds the new file first. A file of that name in a directory
    searched later (this source tree's ``checkpoints/``, torch hub's cache) is never overwritten.
    """
    if if_missing not in ("raise", "none", "destination"):
        raise ValueError(f"if_missing must be 'raise', 'none' or 'destination', got {if_missing!r}")
    if if_missing == "destination":
        p = Path(name_or_path).expanduser()
        return checkpoint_dirs()[0] / p.name if _is_bare_name(p) else p
    found = find_checkpoint(name_or_path)
    if found is not None or if_missing == "none":
        return found
    searched = ", ".join(str(d) for d in checkpoint_dirs())
    raise MissingCheckpointError(
        f"{what}: file '{name_or_path}' not found (searched: {searched}). Nothing is downloaded by "
        f"lightning_gi; put the file in ./checkpoints/ or set LIGHTNING_GI_CHECKPOINTS. "
        f"See {CHECKPOINTS_README} for which file goes where."
    )


def _first_sentence(err: BaseException, limit: int = 120) -> str:
    """The first sentence of an error message (torch's loader errors run to several paragraphs)."""
    text = " ".join(str(err).split())
    cut = text.find(". ")
    text = text if cut < 0 else text[: cut + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_state_dict_file(path: str | os.PathLike, what: str = "state_dict") -> dict[str, torch.Tensor]:
    """Load a state dict (.pt/.pth via weights_only=True, or .safetensors) without executing code."""
    path = resolve_checkpoint(path, what)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CorruptCheckpointError(
            f"{what}: cannot read '{path}' ({type(err).__name__}: {_first_sentence(err)}); the file is corrupt, "
            f"truncated or not a plain state dict. See {CHECKPOINTS_README}."
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CorruptCheckpointError(f"{what}: '{path}' does not hold a dict of tensors (a state_dict)")
    return sd
