"""GIML: gradient inversion to meta-learn a generator (Jeon et al., NeurIPS 2021, Sec. 4.2 and Appendix A).

No pretrained generator is needed: the attacker observes many gradients (different FL rounds or clients: the
"tasks" of :class:`GradientTasks`) and meta-learns a generator ``G_theta`` from them, Reptile-style. For each
task (a batch of ``N`` images' gradient):

1. latent search with ``theta`` fixed: ``latent_steps`` Adam steps (lr ``latent_lr`` = 3e-2) on
   ``D(grad(A(G_theta(z))), g) + a_TV TV + latent_l2 * mean(z^2)`` (the l2 term, 1e-3, keeps the search of an
   untrained generator from diverging);
2. adaptation: a copy ``theta'`` of the generator trained ``adapt_steps`` steps (lr ``adapt_lr`` = 1e-3) on the
   same loss with the latents fixed (one copy for the whole task: the "integrated" parameter search);
3. outer (meta) update: the generator's gradient is set to ``theta - theta'`` and Adam (``meta_lr`` = 1e-2)
   steps, i.e. ``theta`` moves towards the adapted weights. (The authors' StyleGAN2 path computed this
   difference on the same object, a no-op; here the adapted copy is a separate module and the outer step is
   tested to move the generator.)

The generator is written to ``generator_out`` (``{"state_dict", "generator": spec}``, loadable by
``create_generator(..., checkpoint_path=...)`` and GIAS's ``checkpoint_path``) at the end and every
``save_every_n_steps``; Lightning checkpoints of this module hold it under ``generator.*`` too.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

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
from .image_prior import DistanceFn

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
    """One observed gradient: the victim as the server knows it, the observation, and (for metrics) the batch."""

    inputs: AttackInputs
    ground_truth: Optional[GroundTruth]
    index: int


class _TaskIndices(IterableDataset):
    def __init__(self, num_tasks: int, seed: int) -> None:
        self.num_tasks, self.seed = num_tasks, seed

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.num_tasks, generator=gen).tolist()


class GradientTasks(pl.LightningDataModule):
    """Many gradient observations of one client population (GIML's training tasks).

    Task ``i`` is the batch-mean gradient of ``batch_size`` images drawn with seed ``task_seed + i`` from the
    dataset, on the victim re-initialised from ``model_seed + i`` (``reinit_model``: gradients from many
    random networks, as the paper's randomly initialised ResNets) or on the victim as given.

    Args:
        model: the victim architecture.
        dataset, data_root, crops_per_photo, crop_seed: the client data (see :func:`~lightning_gi.victim.data.build_dataset`).
        image_shape, mean, std: the victim's input geometry and normalisation.
        batch_size: images per observed gradient (paper: 4).
        num_tasks: number of distinct observations cycled through (shuffled).
        task_seed, model_seed, reinit_model: see above.
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
        reinit_model: bool = True,
        crops_per_photo: int = 8,
        crop_seed: int = 0,
        share_labels: bool = True,
        defenses: Optional[list[Defense]] = None,
        label_mode: str = "unique",
    ) -> None:
        super().__init__()
        c = image_shape[0]
        self.model = model.eval()
        self.dataset_name, self.data_root = dataset, data_root
        self.image_shape = tuple(int(v) for v in image_shape)
        self.mean = torch.tensor(list(mean) if mean is not None else [0.0] * c, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std) if std is not None else [1.0] * c, dtype=torch.float32).view(-1, 1, 1)
        self.batch_size, self.num_tasks = int(batch_size), int(num_tasks)
        self.task_seed, self.model_seed, self.reinit_model = int(task_seed), int(model_seed), bool(reinit_model)
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
        """Build task ``index`` (re-initialises the shared victim module when ``reinit_model``)."""
        from ..victim.data import select_batch

        self.setup()
        if self.reinit_model:
            reinitialise(self.model, self.model_seed + index)
        images, labels, _ = select_batch(self._dataset, self.batch_size, seed=self.task_seed + index, label_mode=self.label_mode)
        obs = capture_observation(self.model, (images - self.mean) / self.std, labels, defenses=self.defenses, share_labels=self.share_labels)
        inputs = AttackInputs(self.model, obs, self.image_shape, self.mean, self.std, int(self.num_classes))
        return GradientTask(inputs, GroundTruth(images, labels), index)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TaskIndices(self.num_tasks, self.task_seed), batch_size=None, num_workers=0)


class GIML(pl.LightningModule):
    """Meta-learn a generator from many gradient observations (Reptile outer loop, Adam meta lr 1e-2).

    Args:
        generator: registry name (default ``"dcgan32"``: an untrained DCGAN 32x32) or a module.
        pretrained, checkpoint_path, generator_kwargs: as in :class:`~lightning_gi.attacks.GIAS` (start from a file).
        meta_lr: Adam learning rate of the outer update (paper 1e-2).
        latent_steps, latent_lr, latent_l2: inner latent search (paper 1000 steps, 3e-2, 1e-3).
        adapt_steps, adapt_lr: inner generator adaptation with latents fixed (paper 500 steps, 1e-3).
        label_strategy: labels per task (default: the shared labels when present, else iDLG).
        distance: gradient distance (default cosine); priors: default ``[TotalVariation(1e-6)]``.
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
        adapt_steps: int = 500,
        adapt_lr: float = 1e-3,
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
        self.generator_name = generator if isinstance(generator, str) else type(generator).__name__
        gen = build_generator(generator, pretrained, checkpoint_path, generator_kwargs)
        for p in gen.parameters():
            p.requires_grad_(True)
        self.generator = gen.eval()
        self.meta_lr = float(meta_lr)
        self.latent_steps, self.latent_lr, self.latent_l2 = int(latent_steps), float(latent_lr), float(latent_l2)
        self.adapt_steps, self.adapt_lr = int(adapt_steps), float(adapt_lr)
        self.label_strategy = label_strategy
        self.distance = distance if distance is not None else CosineDistance()
        self.priors = nn.ModuleList([TotalVariation(weight=1e-6)] if priors is None else priors)
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

    def inner_loop(self, inputs: AttackInputs, generator: Optional[torch.Generator] = None) -> tuple[nn.Module, Tensor, dict[str, float]]:
        """Latent search then adaptation of a copy of the generator on one task; returns (adapted copy, z, stats)."""
        device = next(self.generator.parameters()).device
        victim = inputs.model.to(device)
        for p in victim.parameters():
            p.requires_grad_(True)
        target = [g.to(device) for g in inputs.observation.gradients]
        labels = self._labels(inputs).to(device)
        out_map = GenerativeOutput(getattr(self.generator, "output_range", (-1.0, 1.0)), inputs.image_shape, inputs.mean, inputs.std).to(device)
        reduction = inputs.observation.loss_reduction
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed + self.meta_steps)
        z = nn.Parameter(self.generator.sample_latents(inputs.observation.batch_size, "z", generator=gen).to(device))
        opt_z = torch.optim.Adam([z], lr=self.latent_lr)
        stats: dict[str, float] = {}
        for _ in range(self.latent_steps):
            images = out_map(self.generator(z))
            loss, d = victim_matching_loss(victim, images, labels, target, self.distance, reduction, self.priors)
            loss = loss + self.latent_l2 * z.pow(2).mean()
            opt_z.zero_grad()
            loss.backward(inputs=[z])
            opt_z.step()
            stats.setdefault("latent_first", float(d.detach()))
            stats["latent_last"] = float(d.detach())
        adapted = copy.deepcopy(self.generator).eval()
        params = list(adapted.parameters())
        opt_g = torch.optim.Adam(params, lr=self.adapt_lr)
        z_fixed = z.detach()
        for _ in range(self.adapt_steps):
            images = out_map(adapted(z_fixed))
            loss, d = victim_matching_loss(victim, images, labels, target, self.distance, reduction, self.priors)
            opt_g.zero_grad()
            loss.backward(inputs=params)
            opt_g.step()
            stats.setdefault("adapt_first", float(d.detach()))
            stats["adapt_last"] = float(d.detach())
        return adapted, z_fixed, stats

    def training_step(self, batch: Any, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "task"):
            raise RuntimeError("GIML needs a GradientTasks datamodule (data:)")
        task = dm.task(int(batch))
        with torch.enable_grad():
            adapted, _, stats = self.inner_loop(task.inputs)
        self.meta_update(adapted)
        self.meta_steps += 1
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


def main(args: Optional[list[str]] = None) -> None:
    """``python -m lightning_gi.attacks.giml fit --config configs/giml/dcgan_photos.yaml`` (LightningCLI)."""
    from pytorch_lightning.cli import LightningCLI

    from ..cli import quiet_known_warnings

    quiet_known_warnings()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    LightningCLI(GIML, GradientTasks, auto_configure_optimizers=False, save_config_kwargs={"overwrite": True}, seed_everything_default=0, args=args)


if __name__ == "__main__":  # pragma: no cover
    import sys

    main(sys.argv[1:])
