"""GIML: gradient inversion to meta-learn a generator (Jeon et al., NeurIPS 2021, Sec. 4.2 and Appendix A).

No pretrained generator is needed: the attacker observes many gradients (different FL rounds or clients: the
"tasks" of :class:`GradientTasks`) and meta-learns a generator ``G_theta`` from them, Reptile-style. As in the
authors' ``train_gen.py`` / ``scripts/meta_train.sh`` (the defaults here), a task is ``N`` = 4 images whose
gradients are observed ONE IMAGE AT A TIME (four single-image gradients, ``gradients_per_task="per_image"``;
``"batch"``: one mean gradient of the N images). For each task:

1. latent search with ``theta`` fixed: ``latent_steps`` Adam steps (lr ``latent_lr`` = 3e-2, MultiStepLR x0.1 at
   3/8, 5/8, 7/8) on ``sum_i [D(grad(A(G_theta(z))_i), g_i) + a_TV TV(A(G_theta(z))) + a_z ||z||_2]`` over the
   task's gradients ``g_i`` (the authors add the priors once per gradient term); ``a_z = 1e-3`` and ``||z||_2``
   the L2 norm of the task's whole latent tensor (``latent_penalty="norm"``, their code; ``"mean_square"``:
   ``mean(z^2)``) keeps the search of an untrained generator from diverging; TV weight 1e-4 (their script);
2. adaptation: a copy ``theta'`` of the generator trained ``adapt_steps`` steps (lr ``adapt_lr`` = 1e-3, the same
   MultiStepLR) on the same loss with the latents fixed (one copy for the whole task: the "integrated"
   parameter search);
3. outer (meta) update: the generator's gradient is set to ``theta - theta'`` and Adam (``meta_lr`` = 1e-2)
   steps, i.e. ``theta`` moves towards the adapted weights. (The authors' StyleGAN2 path computed this
   difference on the same object, a no-op; here the adapted copy is a separate module and the outer step is
   tested to move the generator.)

The victim: ONE model (``victim_mode="sgd_every"``, the authors' code) that the server trains as FL proceeds:
after every ``victim_update_every`` = 50 tasks, one SGD step (lr 1e-4) on that task's batch. ``"reinit"`` draws
a fresh random network per task; ``"fixed"`` never changes it.

The generator is written to ``generator_out`` (``{"state_dict", "generator": spec}``, loadable by
``create_generator(..., checkpoint_path=...)`` and GIAS's ``checkpoint_path``) at the end and every
``save_every_n_steps``; Lightning checkpoints of this module hold it under ``generator.*`` too.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ..labels import IDLGLabels, LabelStrategy, SharedLabels
from ..objectives.distances import CosineDistance
from ..objectives.priors import TotalVariation
from ..observation import GradientObservation, capture_observation
from ..victim.datamodule import AttackInputs, GroundTruth
from ..victim.defenses import Defense
from ..victim.models import reinitialise
from .gias import GenerativeOutput, build_generator
from .image_prior import INVERTING_GRADIENTS_MILESTONES, DistanceFn, milestones_from_fractions

__all__ = ["GIML", "GradientTasks", "GradientTask", "victim_matching_loss"]


def victim_matching_loss(
    victim: nn.Module,
    images: Tensor,
    labels: Tensor,
    target: Sequence[Tensor],
    distance: Any,
    reduction: str = "mean",
    priors: Sequence[nn.Module] = (),
) -> tuple[Tensor, Tensor]:
    """(loss, matching distance) of a batch in the victim's input space: gradient distance + weighted priors."""
    params = [p for p in victim.parameters()]
    logits = victim(images)
    loss = nn.functional.cross_entropy(logits, labels, reduction=reduction)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    d = distance(list(grads), list(target), None, None)
    total = d
    for prior in priors:
        w = float(getattr(prior, "weight", 1.0))
        if w:
            total = total + w * prior(images)
    return total, d


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
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.num_classes = linears[-1].out_features if linears else None
        self._dataset = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self._dataset is None:
            from ..victim.data import build_dataset

            self._dataset = build_dataset(self.dataset_name, root=self.data_root, image_size=self.image_shape[1], channels=self.image_shape[0], crops_per_photo=self.crops_per_photo, seed=self.crop_seed)

    def task(self, index: int) -> GradientTask:
        """Build task ``index`` on the victim's current state (re-initialised per task for ``"reinit"``)."""
        from ..victim.data import select_batch

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


class GIML(pl.LightningModule):
    """Meta-learn a generator from many gradient observations (Reptile outer loop, Adam meta lr 1e-2).

    Args:
        generator: registry name (default ``"dcgan32"``: an untrained DCGAN 32x32) or a module.
        pretrained, checkpoint_path, generator_kwargs: as in :class:`~lightning_gi.attacks.GIAS` (start from a file).
        meta_lr: Adam learning rate of the outer update (paper 1e-2).
        latent_steps, latent_lr, latent_l2: inner latent search (authors 1000 steps, 3e-2, 1e-3).
        latent_penalty: ``"norm"`` (``latent_l2 * ||z||_2``, the authors' code) or ``"mean_square"``
            (``latent_l2 * mean(z^2)``); the paper only says "l2-regularization".
        adapt_steps, adapt_lr: inner generator adaptation with latents fixed (authors 500 steps, 1e-3).
        milestone_fractions, lr_gamma: MultiStepLR of both inner loops (authors: 3/8, 5/8, 7/8 and 0.1);
            None: constant learning rates.
        label_strategy: labels per observation (default: the shared labels when present, else iDLG).
        distance: gradient distance (default cosine); priors: default ``[TotalVariation(1e-4)]`` (the authors'
            ``meta_train.sh``; the paper's GIAS text uses 1e-6).
        generator_out: where the meta-learned generator is written (None: not written).
        save_every_n_steps: also write it every this many meta-steps (0: only at the end).
        seed: seed of the latent initialisations.
    """

    def __init__(
        self,
        generator: Union[str, nn.Module] = "dcgan32",
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        generator_kwargs: Optional[dict[str, Any]] = None,
        meta_lr: float = 1e-2,
        latent_steps: int = 1000,
        latent_lr: float = 3e-2,
        latent_l2: float = 1e-3,
        latent_penalty: Literal["norm", "mean_square"] = "norm",
        adapt_steps: int = 500,
        adapt_lr: float = 1e-3,
        milestone_fractions: Optional[list[float]] = list(INVERTING_GRADIENTS_MILESTONES),
        lr_gamma: float = 0.1,
        label_strategy: Optional[LabelStrategy] = None,
        distance: Optional[DistanceFn] = None,
        priors: Optional[list[nn.Module]] = None,
        generator_out: Optional[str] = "checkpoints/giml_dcgan32.pt",
        save_every_n_steps: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if latent_steps < 0 or adapt_steps < 1:
            raise ValueError(f"need latent_steps >= 0 and adapt_steps >= 1, got {latent_steps}, {adapt_steps}")
        if latent_penalty not in ("norm", "mean_square"):
            raise ValueError(f"latent_penalty must be 'norm' or 'mean_square', got {latent_penalty!r}")
        if milestone_fractions is not None:
            milestones_from_fractions(milestone_fractions, 1_000_000)
        self.generator_name = generator if isinstance(generator, str) else type(generator).__name__
        gen = build_generator(generator, pretrained, checkpoint_path, generator_kwargs)
        for p in gen.parameters():
            p.requires_grad_(True)
        self.generator = gen.eval()
        self.meta_lr = float(meta_lr)
        self.latent_steps, self.latent_lr, self.latent_l2 = int(latent_steps), float(latent_lr), float(latent_l2)
        self.latent_penalty = latent_penalty
        self.adapt_steps, self.adapt_lr = int(adapt_steps), float(adapt_lr)
        self.milestone_fractions = None if milestone_fractions is None else [float(f) for f in milestone_fractions]
        self.lr_gamma = float(lr_gamma)
        self.label_strategy = label_strategy
        self.distance = distance if distance is not None else CosineDistance()
        self.priors = nn.ModuleList([TotalVariation(weight=1e-4)] if priors is None else priors)
        self.generator_out = generator_out
        self.save_every_n_steps = int(save_every_n_steps)
        self.seed = int(seed)
        self.meta_steps = 0
        self.history: list[dict[str, float]] = []

    def train(self, mode: bool = True) -> "GIML":
        super().train(mode)
        self.generator.eval()  # BatchNorm uses running statistics: images of a task do not interact
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.generator.parameters(), lr=self.meta_lr)

    # ------------------------------------------------------------------ one task
    def _labels(self, inputs: AttackInputs) -> Tensor:
        if self.label_strategy is not None:
            return self.label_strategy(inputs.observation, inputs.model)
        if inputs.observation.labels is not None:
            return SharedLabels()(inputs.observation, inputs.model)
        return IDLGLabels()(inputs.observation, inputs.model)

    def _scheduler(self, opt: torch.optim.Optimizer, length: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
        if self.milestone_fractions is None or length < 2:
            return None
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones_from_fractions(self.milestone_fractions, length), gamma=self.lr_gamma)

    def latent_penalty_value(self, z: Tensor) -> Tensor:
        """``||z||_2`` of the task's whole latent tensor (``"norm"``) or ``mean(z^2)`` (``"mean_square"``)."""
        return z.norm(p=2) if self.latent_penalty == "norm" else z.pow(2).mean()

    def inner_loop(
        self, inputs: Union[AttackInputs, Sequence[AttackInputs]], generator: Optional[torch.Generator] = None
    ) -> tuple[nn.Module, Tensor, dict[str, float]]:
        """Latent search then adaptation of a copy of the generator on one task (one observation or several,
        e.g. the four single-image gradients of the authors' tasks); returns (adapted copy, z, stats)."""
        parts = [inputs] if isinstance(inputs, AttackInputs) else list(inputs)
        if not parts:
            raise ValueError("a GIML task needs at least one observation")
        device = next(self.generator.parameters()).device
        targets, labels, sizes = [], [], []
        for part in parts:
            victim = part.model.to(device)
            for p in victim.parameters():
                p.requires_grad_(True)
            targets.append([g.to(device) for g in part.observation.gradients])
            labels.append(self._labels(part).to(device))
            sizes.append(part.observation.batch_size)
        first = parts[0]
        out_map = GenerativeOutput(getattr(self.generator, "output_range", (-1.0, 1.0)), first.image_shape, first.mean, first.std).to(device)
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed + self.meta_steps)
        z = nn.Parameter(self.generator.sample_latents(sum(sizes), "z", generator=gen).to(device))

        def task_loss(net: nn.Module, latents: Tensor, with_penalty: bool) -> tuple[Tensor, Tensor]:
            images = out_map(net(latents))
            total: Optional[Tensor] = None
            dist = images.new_zeros(())
            start = 0
            for part, target, lab, n in zip(parts, targets, labels, sizes):
                part_images = images[start : start + n]
                start += n
                _, d = victim_matching_loss(part.model, part_images, lab, target, self.distance, part.observation.loss_reduction)
                term = d
                for prior in self.priors:  # the authors add the priors of the whole task's images per gradient term
                    w = float(getattr(prior, "weight", 1.0))
                    if w:
                        term = term + w * prior(images)
                if with_penalty and self.latent_l2 > 0:
                    term = term + self.latent_l2 * self.latent_penalty_value(latents)
                total = term if total is None else total + term
                dist = dist + d.detach()
            return total, dist / len(parts)

        opt_z = torch.optim.Adam([z], lr=self.latent_lr)
        sched_z = self._scheduler(opt_z, self.latent_steps)
        stats: dict[str, float] = {}
        for _ in range(self.latent_steps):
            loss, d = task_loss(self.generator, z, True)
            opt_z.zero_grad()
            loss.backward(inputs=[z])
            opt_z.step()
            if sched_z is not None:
                sched_z.step()
            stats.setdefault("latent_first", float(d))
            stats["latent_last"] = float(d)
        adapted = copy.deepcopy(self.generator).eval()
        params = list(adapted.parameters())
        opt_g = torch.optim.Adam(params, lr=self.adapt_lr)
        sched_g = self._scheduler(opt_g, self.adapt_steps)
        z_fixed = z.detach()
        for _ in range(self.adapt_steps):
            loss, d = task_loss(adapted, z_fixed, False)  # the penalty is constant with z fixed
            opt_g.zero_grad()
            loss.backward(inputs=params)
            opt_g.step()
            if sched_g is not None:
                sched_g.step()
            stats.setdefault("adapt_first", float(d))
            stats["adapt_last"] = float(d)
        return adapted, z_fixed, stats

    def training_step(self, batch: Any, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "task"):
            raise RuntimeError("GIML needs a GradientTasks datamodule (data:)")
        task = dm.task(int(batch))
        with torch.enable_grad():
            adapted, _, stats = self.inner_loop(task.observations if isinstance(task, GradientTask) else task.inputs)
        self.meta_update(adapted)
        self.meta_steps += 1
        if hasattr(dm, "after_task"):  # the server's own training of the victim as FL proceeds
            stats["victim_stepped"] = float(dm.after_task(task))
        stats["meta_step"] = float(self.meta_steps)
        self.history.append(stats)
        for k in ("latent_last", "adapt_last"):
            if k in stats:
                self.log(f"giml/{k}", stats[k], prog_bar=(k == "adapt_last"))
        if self.save_every_n_steps and self.meta_steps % self.save_every_n_steps == 0:
            self.save_generator()

    @torch.no_grad()
    def meta_update(self, adapted: nn.Module) -> None:
        """Reptile: gradient = current - adapted weights, one Adam step of the meta optimiser (moves G)."""
        opt = self.optimizers()
        opt.zero_grad()
        for p, q in zip(self.generator.parameters(), adapted.parameters()):
            p.grad = (p.detach() - q.detach().to(p.device)).clone()
        opt.step()
        # buffers (e.g. BatchNorm running statistics) are not meta-learned; keep the generator's own

    def save_generator(self, path: Optional[str] = None) -> Optional[str]:
        path = path or self.generator_out
        if not path or (self._trainer is not None and not self.trainer.is_global_zero):
            return None
        from ..generators.registry import save_generator

        name = self.generator_name if self.generator_name.startswith("dcgan") else None
        save_generator(self.generator, path, name=name)
        return str(path)

    def on_train_end(self) -> None:
        self.save_generator()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["giml"] = {"meta_steps": self.meta_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.meta_steps = int(checkpoint.get("giml", {}).get("meta_steps", 0))


def main(args: Optional[list[str]] = None) -> Any:
    """``lightning-gi giml --config configs/giml/dcgan_photos.yaml`` (also ``python -m lightning_gi.attacks.giml
    --config ...``): a LightningCLI over GIML and GradientTasks; the ``fit`` subcommand is implied (accepted
    too). Returns the LightningCLI."""
    import sys

    from pytorch_lightning.cli import LightningCLI

    from ..cli import configure_output

    configure_output()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] != "fit":
        argv = ["fit", *argv]
    return LightningCLI(GIML, GradientTasks, auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
                        seed_everything_default=0, args=argv)


if __name__ == "__main__":  # pragma: no cover
    import sys

    main(sys.argv[1:])
