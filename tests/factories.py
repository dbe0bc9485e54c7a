"""Shared test factories: small victims, real bundled images, lean Trainers, the in-process CLI, and the
official-layout StyleGAN2-ADA pickle writer. Importable from every test module (tests/ is on sys.path through
tests/conftest.py); conftest.py wraps the common ones as fixtures."""
from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
import types
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from lightning_gi.generators import StyleGAN2Generator
from lightning_gi.victim import LeNet
from lightning_gi.victim.data import build_dataset, select_batch
from lightning_gi.victim.models import reinitialise


# ---------------------------------------------------------------------------------------------- victims and data
def lenet(size: int = 16, seed: int = 0, num_classes: int = 10) -> torch.nn.Module:
    """The DLG sigmoid LeNet with its own initialisation re-drawn from ``seed``."""
    return reinitialise(LeNet(num_classes=num_classes, image_size=size), seed)


def photos(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` bundled photographs (distinct labels, the victims' private pool) in [0, 1], and their labels."""
    images, labels, _ = select_batch(build_dataset("photographs", image_size=size, channels=3), n, seed=seed)
    return images, labels


def photo_victim(size: int = 16, batch_size: int = 1, seed: int = 0, **victim):
    """A ``Victim``: the 14-class sigmoid LeNet (initialisation seed ``seed``) on ``batch_size`` bundled photographs
    (batch seed ``seed``); ``victim`` are further ``Victim`` arguments (normalisation, client, defenses, ...)."""
    from lightning_gi.victim import DatasetImages, Victim

    return Victim(LeNet(num_classes=14, image_size=size), source=DatasetImages("photographs", batch_size=batch_size, batch_seed=seed),
                  image_shape=(3, size, size), model_seed=seed, **victim)


def one_photo_case(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(a 10-class 16x16 LeNet drawn under ``torch.manual_seed(seed)``, one bundled photograph [1,3,16,16], label [2])."""
    from lightning_gi.victim.data import BundledPhotographs

    torch.manual_seed(seed)
    model = LeNet(num_classes=10, image_size=16)
    image = BundledPhotographs(image_size=16, crops_per_photo=1)[5][0].unsqueeze(0)
    return model, image, torch.tensor([2])


def plain_idlg_lbfgs(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, seed: int, steps: int) -> torch.Tensor:
    """The iDLG reference in plain PyTorch (no lightning_gi): squared-L2 gradient matching, L-BFGS (lr 1, 20 inner
    iterations, history 100), the dummy drawn from N(0, 1) with ``seed``; returns the dummy after ``steps`` steps."""
    params = list(model.parameters())
    loss_fn = torch.nn.functional.cross_entropy
    target = [g.detach() for g in torch.autograd.grad(loss_fn(model(image), label), params)]
    dummy = torch.randn(tuple(image.shape), generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    opt = torch.optim.LBFGS([dummy], lr=1.0, max_iter=20, history_size=100)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        grads = torch.autograd.grad(loss_fn(model(dummy), label), params, create_graph=True)
        loss = sum(((g - t) ** 2).sum() for g, t in zip(grads, target))
        loss.backward(inputs=[dummy])
        return loss

    for _ in range(steps):
        opt.step(closure)
    return dummy


def lean_trainer(steps: int, tmp_path: Any, **overrides: Any) -> pl.Trainer:
    """A CPU Trainer without logger, progress bar or checkpoints, for ``steps`` optimiser steps."""
    kwargs: dict[str, Any] = dict(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``lightning-gi argv`` (``lightning_gi.cli.main``) in this process: (exit status, stdout, stderr)."""
    from lightning_gi.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


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
