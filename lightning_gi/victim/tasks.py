"""GIML's training tasks: many gradient observations of one simulated client population.

The victim side of GIML (Jeon et al. 2021): :class:`GradientTasks` simulates the clients (their batches, the
victim model the server trains as FL proceeds) and hands :class:`~lightning_gi.attacks.GIML` one
:class:`GradientTask` per step. Moved here from :mod:`lightning_gi.attacks.giml` (still importable there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ..observation import capture_observation
from .datamodule import AttackInputs, GroundTruth, infer_num_classes
from .defenses import Defense
from .models import reinitialise

__all__ = ["GradientTasks", "GradientTask"]


@dataclass
class GradientTask:
    """One task: the gradients GIML inverts (``parts``), the batch-mean observation (``inputs``, e.g. to
    evaluate GIAS on it) and, for metrics and the victim's training step, the batch itself."""

    inputs: AttackInputs
    ground_truth: Optional[GroundTruth]
    index: int
    parts: Optional[list[AttackInputs]] = None  # None: [inputs]
    victim_input: Optional[Tensor] = None  # the normalised batch (the server's SGD step of victim_mode "sgd_every")

    @property
    def observations(self) -> list[AttackInputs]:
        return list(self.parts) if self.parts else [self.inputs]


class _TaskIndices(IterableDataset):
    def __init__(self, num_tasks: int, seed: int) -> None:
        self.num_tasks, self.seed = num_tasks, seed

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.num_tasks, generator=gen).tolist()


class GradientTasks(pl.LightningDataModule):
    """Many gradient observations of one client population (GIML's training tasks).

    Task ``i`` holds ``batch_size`` images drawn with seed ``task_seed + i`` from the dataset; GIML inverts their
    ``batch_size`` single-image gradients (``gradients_per_task="per_image"``, the authors' ``train_gen.py``) or
    their one batch-mean gradient (``"batch"``). ``task.inputs`` is always the batch-mean observation.

    The victim (``victim_mode``): ``"sgd_every"`` (default, the authors' code) is one model initialised from
    ``model_seed`` that takes one SGD step (lr ``victim_lr`` = 1e-4, cross-entropy) on a task's batch after every
    ``victim_update_every`` = 50 tasks (:meth:`after_task`, called by GIML after each meta-step); ``"reinit"``
    re-initialises it from ``model_seed + i`` for task ``i`` (gradients of many random networks); ``"fixed"``
    keeps it at ``model_seed``.

    Args:
        model: the victim architecture.
        dataset, data_root, crops_per_photo, crop_seed: the client data (see :func:`~lightning_gi.victim.data.build_dataset`).
        image_shape, mean, std: the victim's input geometry and normalisation.
        batch_size: images per observed gradient (paper: 4).
        num_tasks: number of distinct observations cycled through (shuffled).
        task_seed, model_seed, victim_mode, victim_update_every, victim_lr, gradients_per_task: see above.
        share_labels: observations carry the labels (the paper's setting) - else labels are recovered.
        defenses: applied to every observed gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: str = "photographs",
        data_root: Optional[str] = None,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        batch_size: int = 4,
        num_tasks: int = 64,
        task_seed: int = 0,
        model_seed: int = 0,
        victim_mode: Literal["sgd_every", "reinit", "fixed"] = "sgd_every",
        victim_update_every: int = 50,
        victim_lr: float = 1e-4,
        gradients_per_task: Literal["per_image", "batch"] = "per_image",
        crops_per_photo: int = 8,
        crop_seed: int = 0,
        share_labels: bool = True,
        defenses: Optional[list[Defense]] = None,
        label_mode: str = "unique",
    ) -> None:
        super().__init__()
        if victim_mode not in ("sgd_every", "reinit", "fixed"):
            raise ValueError(f"victim_mode must be 'sgd_every', 'reinit' or 'fixed', got {victim_mode!r}")
        if gradients_per_task not in ("per_image", "batch"):
            raise ValueError(f"gradients_per_task must be 'per_image' or 'batch', got {gradients_per_task!r}")
        if victim_update_every < 1 or victim_lr < 0:
            raise ValueError(f"need victim_update_every >= 1 and victim_lr >= 0, got {victim_update_every}, {victim_lr}")
        c = image_shape[0]
        self.model = model.eval()
        self.dataset_name, self.data_root = dataset, data_root
        self.image_shape = tuple(int(v) for v in image_shape)
        self.mean = torch.tensor(list(mean) if mean is not None else [0.0] * c, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std) if std is not None else [1.0] * c, dtype=torch.float32).view(-1, 1, 1)
        self.batch_size, self.num_tasks = int(batch_size), int(num_tasks)
        self.task_seed, self.model_seed = int(task_seed), int(model_seed)
        self.victim_mode, self.victim_update_every, self.victim_lr = victim_mode, int(victim_update_every), float(victim_lr)
        self.gradients_per_task = gradients_per_task
        self.tasks_done = 0  # tasks finished (after_task calls): drives the victim's SGD steps
        self._victim_initialised = False
        self.crops_per_photo, self.crop_seed = int(crops_per_photo), int(crop_seed)
        self.share_labels, self.defenses, self.label_mode = bool(share_labels), list(defenses or []), label_mode
        self.num_classes = infer_num_classes(model)
        self._dataset = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self._dataset is None:
            from .data import build_dataset

            self._dataset = build_dataset(self.dataset_name, root=self.data_root, image_size=self.image_shape[1], channels=self.image_shape[0], crops_per_photo=self.crops_per_photo, seed=self.crop_seed)

    def task(self, index: int) -> GradientTask:
        """Build task ``index`` on the victim's current state (re-initialised per task for ``"reinit"``)."""
        from .data import select_batch

        self.setup()
        if self.victim_mode == "reinit":
            reinitialise(self.model, self.model_seed + index)
        elif not self._victim_initialised:
            reinitialise(self.model, self.model_seed)
        self._victim_initialised = True
        self.model.eval()
        images, labels, _ = select_batch(self._dataset, self.batch_size, seed=self.task_seed + index, label_mode=self.label_mode)
        x = (images - self.mean) / self.std
        obs = capture_observation(self.model, x, labels, defenses=self.defenses, share_labels=self.share_labels)
        inputs = AttackInputs(self.model, obs, self.image_shape, self.mean, self.std, int(self.num_classes))
        parts = None
        if self.gradients_per_task == "per_image":
            parts = [
                AttackInputs(self.model, capture_observation(self.model, x[i : i + 1], labels[i : i + 1], defenses=self.defenses, share_labels=self.share_labels), self.image_shape, self.mean, self.std, int(self.num_classes))
                for i in range(images.shape[0])
            ]
        return GradientTask(inputs, GroundTruth(images, labels), index, parts=parts, victim_input=x)

    def after_task(self, task: GradientTask) -> bool:
        """One task done; for ``"sgd_every"`` take the server's SGD step on its batch every
        ``victim_update_every`` tasks (as FL training proceeds). Returns whether the victim moved."""
        self.tasks_done += 1
        if self.victim_mode != "sgd_every" or self.tasks_done % self.victim_update_every or task.victim_input is None:
            return False
        model = self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.train()
        with torch.enable_grad():
            for p in model.parameters():
                p.grad = None
            loss = nn.functional.cross_entropy(model(task.victim_input.to(device)), task.ground_truth.labels.to(device))
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        with torch.no_grad():
            for p, g in zip([p for p in model.parameters() if p.requires_grad], grads):
                p.sub_(self.victim_lr * g)
        model.train(was_training)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed with the Trainer: the victim's weights and the task counter (resume-safe victim)."""
        return {"tasks_done": self.tasks_done, "victim_initialised": self._victim_initialised, "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks_done = int(state.get("tasks_done", 0))
        self._victim_initialised = bool(state.get("victim_initialised", False))
        if "model" in state:
            self.model.load_state_dict(state["model"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TaskIndices(self.num_tasks, self.task_seed), batch_size=None, num_workers=0)

