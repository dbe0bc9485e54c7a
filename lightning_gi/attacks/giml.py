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
from typing import Any, Literal, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ..client import client_gradient
from ..generators.build import GenerativeOutput, build_generator
from ..labels import IDLGLabels, LabelStrategy, SharedLabels
from ..objectives.distances import CosineDistance
from ..objectives.priors import TotalVariation
from ..observation import GradientObservation
from ..victim.datamodule import AttackInputs
from ..victim.tasks import GradientTask, GradientTasks, _TaskIndices  # noqa: F401 (moved to victim.tasks; re-exported)
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
    grads, _ = client_gradient(victim, images, labels, create_graph=True, reduction=reduction)  # the one client simulation
    d = distance(list(grads), list(target), None, None)
    total = d
    for prior in priors:
        w = float(getattr(prior, "weight", 1.0))
        if w:
            total = total + w * prior(images)
    return total, d


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
        generator_out: where the meta-learned generator is written (None: not written); a bare file name goes
            where the checkpoint search finds it first (``$LIGHTNING_GI_CHECKPOINTS`` when set, else
            ``./checkpoints/``; the default is the file of the registry's ``dcgan_giml32``).
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
        generator_out: Optional[str] = "giml_dcgan32.pt",
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
        from ..checkpoints import resolve_checkpoint
        from ..generators.registry import save_generator

        path = resolve_checkpoint(path, if_missing="destination")
        name = self.generator_name if self.generator_name.startswith("dcgan") else None
        save_generator(self.generator, path, name=name)
        return str(path)

    def on_train_end(self) -> None:
        self.save_generator()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["giml"] = {"meta_steps": self.meta_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.meta_steps = int(checkpoint.get("giml", {}).get("meta_steps", 0))
