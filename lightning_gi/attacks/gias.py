"""GIAS: gradient inversion in alternative spaces (Jeon et al., NeurIPS 2021).

Given a generator ``G`` pretrained on (an approximation of) the client's data distribution, GIAS searches

1. the **latent space** (``latent_steps`` optimiser steps, Adam lr ``latent_lr`` = 3e-2)::

       z* = argmin_z  D(grad_W L(A(G(z)), y), g) + a_TV TV(A(G(z))) [+ a_z ||z||^2]

   over ``z`` (DCGAN, StyleGAN2), ``w`` or ``w+`` (StyleGAN2), with ``restarts`` initialisations optimised side
   by side; the restart with the lowest matching distance wins;
2. the **parameter space** (``param_steps`` steps, Adam lr ``param_lr`` = 1e-3): one copy of the synthesis
   network per image, initialised from the pretrained weights, trained with the winner's latent FIXED::

       theta_i* = argmin_{theta_1..theta_N}  D(grad_W L(A(G_{theta_i}(z*_i))_i, y), g) + a_TV TV(...)

``A`` maps the generator output (range [-1, 1]) to [0, 1], average-pools it by an integer factor to the victim's
resolution (the authors' 64x64 ImageNet setting pools a 512 px StyleGAN2 by 8; a resolution that is not an integer
multiple of the victim's raises ``ValueError`` at bind) and applies the victim's normalisation. ``D`` is the
cosine distance over all gradient tensors, TV weight 1e-6, MultiStepLR (gamma 0.1) at 3/8, 5/8, 7/8 of each
phase, labels from the gradient (or shared labels).

The two phases are one Lightning run with manual optimisation: ``configure_optimizers`` returns the latent
optimiser and the parameter optimiser (each with its MultiStepLR); ``training_step`` uses the first for steps
``0 .. latent_steps-1`` and then switches (:meth:`switch_to_parameter_phase`: freeze the winner's best
latents, from then on only the generator copies are unknowns). With ``trainer.max_steps=-1`` the attack stops
itself after ``latent_steps + param_steps`` steps; a smaller ``max_steps`` truncates the schedule.

The best iterate is kept by matching distance over both phases, and it is one consistent point: the distance,
the images, the latents and (parameter phase, ``keep_best_generator``) the synthesis copies' weights are all
recorded before the optimiser step moves them, so the stored latent regenerates exactly the stored image and
the parameter phase starts from exactly the latent phase's best image. :meth:`reconstruction` also returns the
latent phase's best images (``latent_phase_images``) so the gain of the parameter phase can be measured;
:meth:`best_synthesis_copies` rebuilds the generator copies of the best iterate.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..checkpoints import MissingCheckpointError, resolve_checkpoint
from ..generators.build import GenerativeOutput, build_generator, generator_resolution, generator_to_unit, pooling_factor  # noqa: F401 (re-exported)
from ..labels import IDLGLabels, LabelStrategy
from ..objectives.distances import CosineDistance
from ..objectives.priors import TotalVariation
from .base import GradientInversionAttack
from .image_prior import INVERTING_GRADIENTS_MILESTONES, DistanceFn, milestones_from_fractions

__all__ = ["GIAS", "build_generator", "generator_to_unit", "GenerativeOutput", "pooling_factor", "generator_resolution"]


def _adam(params: Any) -> torch.optim.Optimizer:  # placeholder for the base class (GIAS builds its own)
    return torch.optim.Adam(params, lr=3e-2)


class GIAS(GradientInversionAttack):
    """GIAS: latent search (z / w / w+, parallel restarts), then per-image generator parameter search.

    Args:
        generator: a registry name (``"dcgan_digits32"``, ``"dcgan_photos32"``, ``"stylegan2_imagenet64"``, ... see
            :func:`lightning_gi.generators.list_generators`) or a generator module (Python use).
        pretrained: load the variant's expected file (``checkpoints/README.md``).
        checkpoint_path: an explicit generator file (``.pkl`` official StyleGAN2-ADA, ``.pt``/``.ckpt``/``.safetensors``).
        generator_kwargs: constructor overrides for the variant.
        train_generator_if_missing: for the priors trained here (``dcgan_digits32``, ``dcgan_photos32``): fit the
            file on the PUBLIC pool when absent (progress on stderr; about 12 s of CPU on one thread for ``dcgan_digits32``).
        latent_space: ``"z"``, ``"w"`` or ``"w+"`` (the last two StyleGAN2 only).
        latent_steps, param_steps: length of each phase (``param_steps=0``: latent search only, "GI-z").
        latent_lr, param_lr: Adam learning rates of the two phases (paper: 3e-2 and 1e-3).
        milestone_fractions, lr_gamma: MultiStepLR of each phase (3/8, 5/8, 7/8 and 0.1); None: constant lr.
        restarts: latent initialisations optimised in parallel; the lowest matching distance wins.
        truncation_psi: initial w/w+ are truncated towards ``w_avg`` by this factor (DCGAN: scales z).
        noise_mode: StyleGAN2 noise inputs (``"const"``: deterministic, default; ``"random"``; ``"none"``).
        latent_l2: weight of ``mean(latent^2)`` (GIML's latent regulariser uses 1e-3; GIAS 0).
        label_strategy: label recovery (default iDLG / negative-row rule; ``SharedLabels`` as in the paper).
        distance: gradient distance (default :class:`CosineDistance`).
        priors: image priors on the victim-space images (default ``[TotalVariation(1e-6)]``).
        keep_best_generator: keep the synthesis copies' weights of the best parameter-phase iterate (one more
            set of copies in memory) for :meth:`best_synthesis_copies`.
        seed: seed of the latent initialisations.
    """

    def __init__(
        self,
        generator: Union[str, nn.Module] = "dcgan_photos32",
        pretrained: bool = True,
        checkpoint_path: Optional[str] = None,
        generator_kwargs: Optional[dict[str, Any]] = None,
        train_generator_if_missing: bool = False,
        latent_space: str = "z",
        latent_steps: int = 1000,
        param_steps: int = 5000,
        latent_lr: float = 3e-2,
        param_lr: float = 1e-3,
        milestone_fractions: Optional[list[float]] = list(INVERTING_GRADIENTS_MILESTONES),
        lr_gamma: float = 0.1,
        restarts: int = 1,
        truncation_psi: float = 1.0,
        noise_mode: str = "const",
        latent_l2: float = 0.0,
        label_strategy: Optional[LabelStrategy] = None,
        distance: Optional[DistanceFn] = None,
        priors: Optional[list[nn.Module]] = None,
        keep_best_generator: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            _adam,
            None,
            label_strategy=label_strategy if label_strategy is not None else IDLGLabels(),
            init="zeros",
            seed=seed,
            distance=distance if distance is not None else CosineDistance(),
        )
        if latent_steps < 0 or param_steps < 0 or latent_steps + param_steps < 1:
            raise ValueError(f"need latent_steps >= 0, param_steps >= 0 and a positive total, got {latent_steps}, {param_steps}")
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        if latent_space not in ("z", "w", "w+"):
            raise ValueError(f"latent_space must be 'z', 'w' or 'w+', got {latent_space!r}")
        if milestone_fractions is not None:
            milestones_from_fractions(milestone_fractions, 1_000_000)
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        self.automatic_optimization = False
        # a module given directly is kept out of the module tree until bind() registers it as ``generator``
        self.__dict__["_given_generator"] = generator if isinstance(generator, nn.Module) else None
        self.generator_spec = generator if isinstance(generator, str) else None
        self.pretrained = bool(pretrained)
        self.checkpoint_path = checkpoint_path
        self.generator_kwargs = dict(generator_kwargs or {})
        self.train_generator_if_missing = bool(train_generator_if_missing)
        self.latent_space = latent_space
        self.latent_steps, self.param_steps = int(latent_steps), int(param_steps)
        self.latent_lr, self.param_lr = float(latent_lr), float(param_lr)
        self.milestone_fractions = None if milestone_fractions is None else [float(f) for f in milestone_fractions]
        self.lr_gamma = float(lr_gamma)
        self.restarts = int(restarts)
        self.truncation_psi = float(truncation_psi)
        self.noise_mode = noise_mode
        self.latent_l2 = float(latent_l2)
        self.keep_best_generator = bool(keep_best_generator)
        self._num_best_copy_params = 0
        for prior in [TotalVariation(weight=1e-6)] if priors is None else priors:
            if not isinstance(prior, nn.Module) or not hasattr(prior, "weight"):
                raise TypeError(f"a prior must be an nn.Module with a 'weight' attribute, got {prior!r}")
            self.priors.append(prior)
        self.step_count = 0
        self.phase = "latent" if self.latent_steps > 0 else "parameter"
        self._switched = False

    def check_generator_file(self) -> None:
        """Raise :class:`MissingCheckpointError` when the generator file is absent (and will not be trained)."""
        if isinstance(self.generator_spec, str) and not self.train_generator_if_missing and not hasattr(self, "generator"):
            from ..generators.registry import generator_file, generator_file_purpose

            wanted = generator_file(self.generator_spec, self.pretrained, self.checkpoint_path)
            if wanted is not None:
                resolve_checkpoint(wanted, generator_file_purpose(self.generator_spec, "GIAS"))

    def prepare_data(self) -> None:
        # Lightning calls this before any datamodule/module setup: a missing generator fails before data is read
        self.check_generator_file()

    # ------------------------------------------------------------------ unknowns
    def create_unknowns(self, generator: torch.Generator) -> None:
        if not hasattr(self, "generator"):
            self.check_generator_file()
            spec = self._given_generator if self._given_generator is not None else self.generator_spec
            gen = build_generator(spec, self.pretrained, self.checkpoint_path, self.generator_kwargs, self.train_generator_if_missing)
            for p in gen.parameters():
                p.requires_grad_(False)
            if hasattr(gen, "noise_mode"):  # StyleGAN2: noise inputs of every layer
                gen.noise_mode = self.noise_mode
            self.generator = gen.eval()
        if self.latent_space not in getattr(self.generator, "latent_spaces", ("z",)):
            raise ValueError(f"{type(self.generator).__name__} has latent spaces {self.generator.latent_spaces}, not {self.latent_space!r}")
        n, r = self.batch_size, self.restarts
        self.output_map = GenerativeOutput(
            getattr(self.generator, "output_range", (-1.0, 1.0)),
            self.inputs.image_shape,
            self.inputs.mean,
            self.inputs.std,
            generator_resolution=generator_resolution(self.generator),
        )
        lat = self.generator.sample_latents(r * n, self.latent_space, generator=generator, truncation_psi=self.truncation_psi)
        self.latents = nn.Parameter(lat.detach().cpu().reshape(r, n, *lat.shape[1:]).clone())
        with torch.no_grad():
            fixed = self.generator.to_synthesis_input(self.latents[0].to(lat.device), self.latent_space)
        self.register_buffer("fixed_input", fixed.detach().cpu().clone())
        self.register_buffer("best_latents", self.latents.detach().clone())
        if self.param_steps > 0:
            net = self.generator.synthesis_network()
            copies = []
            for _ in range(n):
                c = copy.deepcopy(net)
                for p in c.parameters():
                    p.requires_grad_(True)
                copies.append(c.eval())
            self.synthesis_copies = nn.ModuleList(copies)
        else:
            self.synthesis_copies = nn.ModuleList()

    def bind(self, inputs: Any, device: Optional[torch.device] = None) -> "GIAS":
        super().bind(inputs, device=device)  # the core's per-restart best state: restart_best_loss [R], ...
        dev = self.latents.device
        self.register_buffer("latent_phase_best_loss", torch.tensor(math.inf, device=dev))
        self.register_buffer("latent_phase_images", self.best_images.detach().clone())
        if self.keep_best_generator:  # buffers: they follow the module's device and are checkpointed
            params = list(self.synthesis_copies.parameters())
            for i, p in enumerate(params):
                self.register_buffer(f"best_copy_param_{i}", p.detach().clone())
            self._num_best_copy_params = len(params)
        return self

    @property
    def _best_copy_params(self) -> list[Tensor]:
        return [getattr(self, f"best_copy_param_{i}") for i in range(self._num_best_copy_params)]

    def train(self, mode: bool = True) -> "GIAS":
        super().train(mode)
        for name in ("generator", "synthesis_copies"):  # BatchNorm etc. of generators stay in eval mode
            if hasattr(self, name):
                getattr(self, name).eval()
        return self

    # ------------------------------------------------------------------ images
    def latent_images(self, latents: Optional[Tensor] = None) -> Tensor:
        """Victim-space images ``[R, N, C, H, W]`` from latents ``[R, N, ...]`` through the frozen generator."""
        lat = self.latents if latents is None else latents
        r, n = lat.shape[:2]
        inp = self.generator.to_synthesis_input(lat.reshape(r * n, *lat.shape[2:]), self.latent_space)
        raw = self.generator.synthesis_network()(inp)
        return self.output_map(raw).reshape(r, n, *self.inputs.image_shape)

    def parameter_images(self) -> Tensor:
        """Victim-space images ``[N, C, H, W]``: copy i of the synthesis network on the fixed latent i."""
        raws = [net(self.fixed_input[i : i + 1]) for i, net in enumerate(self.synthesis_copies)]
        return self.output_map(torch.cat(raws))

    def restart_images(self) -> Tensor:
        """Latent phase: every restart's images ``[R, N, ...]``; parameter phase: the copies' images ``[1, N, ...]``."""
        if self.phase == "parameter":
            return self.parameter_images().unsqueeze(0)
        return self.latent_images()

    def dummy_batch(self) -> tuple[Tensor, Tensor]:
        if self.phase == "parameter" and self._switched:
            return self.parameter_images(), self.labels
        lead = self.leading_restart()
        return self.latent_images(self.latents[lead].unsqueeze(0))[0], self.labels

    def extra_terms(self) -> dict[str, Tensor]:
        """The latent penalty ``latent_l2 * mean(latent^2)`` per restart, summed (latent phase only)."""
        if self.phase == "latent" and self.latent_l2 > 0:
            return {"latent_l2": self.latent_l2 * self.latents.pow(2).flatten(2).mean(-1).mean(-1).sum()}
        return {}

    # ------------------------------------------------------------------ schedule
    def configure_optimizers(self) -> Any:
        opt_latent = torch.optim.Adam([self.latents], lr=self.latent_lr)
        copy_params = [p for p in self.synthesis_copies.parameters()]
        opt_param = torch.optim.Adam(copy_params if copy_params else [nn.Parameter(torch.zeros(1))], lr=self.param_lr)
        out = []
        for opt, length in ((opt_latent, self.latent_steps), (opt_param, self.param_steps)):
            if self.milestone_fractions is not None and length >= 2:
                sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones_from_fractions(self.milestone_fractions, length), gamma=self.lr_gamma)
            else:
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
            out.append((opt, sched))
        return [o for o, _ in out], [s for _, s in out]

    @property
    def total_steps(self) -> int:
        return self.latent_steps + self.param_steps

    @torch.no_grad()
    def switch_to_parameter_phase(self) -> None:
        """End of the latent phase: freeze the winning restart's best latents; the copies become the unknowns."""
        winner = self.leading_restart()
        self.latent_phase_best_loss.copy_(self.restart_best_loss[winner])
        self.latent_phase_images.copy_(self.restart_best_images[winner])
        self.fixed_input.copy_(self.generator.to_synthesis_input(self.best_latents[winner], self.latent_space))
        self.latents.requires_grad_(False)
        self.phase = "parameter"
        self._switched = True

    def phase_unknowns(self) -> list[Tensor]:
        if self.phase == "latent":
            return [self.latents]
        return [p for p in self.synthesis_copies.parameters() if p.requires_grad]

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        loss.backward(inputs=self.phase_unknowns())

    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        if self.step_count >= self.total_steps:
            self.trainer.should_stop = True
            return None
        if self.step_count >= self.latent_steps and not self._switched:
            if self.param_steps == 0:
                self.trainer.should_stop = True
                return None
            if self.latent_steps > 0:
                self.evaluate_final_iterate()  # score the latent phase's last step before freezing it
                self.switch_to_parameter_phase()
            else:
                self.phase, self._switched = "parameter", True
        optimizers = self.optimizers()
        schedulers = self.lr_schedulers()
        idx = 0 if self.phase == "latent" else 1
        opt, sched = optimizers[idx], schedulers[idx]
        opt.zero_grad()
        loss, distance, images, terms = self.evaluate()
        self.manual_backward(loss)
        # record the iterate these values belong to BEFORE the step moves the latents / copies
        self.update_best(distance.detach(), images.detach())
        opt.step()
        sched.step()
        self.step_count += 1
        self.log("matching_distance", distance.detach().min(), prog_bar=True)
        for name, value in terms.items():
            self.log(f"prior/{name}", value.detach())
        if self.step_count >= self.total_steps and self.trainer.max_steps in (-1, None):
            self.trainer.should_stop = True
        return loss.detach()

    def on_train_start(self) -> None:
        max_steps = self.trainer.max_steps
        if max_steps not in (-1, None) and max_steps < self.total_steps:
            warnings.warn(f"trainer.max_steps={max_steps} < latent_steps + param_steps = {self.total_steps}: the GIAS schedule is truncated")

    # ------------------------------------------------------------------ best iterate
    def best_state(self) -> dict[str, Tensor]:
        """Latent phase: each restart's latents and the step they come from (kept with its best iterate)."""
        return {"latents": self.latents, "step": torch.full((self.restarts,), self.step_count, device=self.latents.device)}

    def init_best(self) -> None:
        super().init_best()
        self.register_buffer("best_latents", self.latents.detach().clone())
        self.register_buffer("best_step", torch.full((self.restarts,), -1, dtype=torch.long, device=self.latents.device))

    def update_best(self, distance: Tensor, images: Tensor) -> None:
        """Keep the best iterate; ``distance`` and ``images`` must come from the CURRENT unknowns (call it before
        the optimiser step), so that latents / copies, images and distance are one point. Latent phase: the core's
        per-restart rule; parameter phase: one batch, continuing from the latent phase's best."""
        if self.phase == "latent":
            super().update_best(distance, images)
            return
        distance, images = distance.reshape(()), images.reshape(images.shape[-4:])
        better = distance < self.best_loss
        self.best_loss = torch.where(better, distance, self.best_loss)
        self.best_images = torch.where(better, images, self.best_images)
        if self._best_copy_params:
            with torch.no_grad():
                for buf, p in zip(self._best_copy_params, self.synthesis_copies.parameters()):
                    buf.copy_(torch.where(better, p.detach(), buf))

    @torch.no_grad()
    def best_synthesis_copies(self) -> nn.ModuleList:
        """The per-image synthesis copies at the best parameter-phase iterate (needs ``keep_best_generator``)."""
        if not self._best_copy_params:
            raise RuntimeError("best_synthesis_copies needs keep_best_generator=True and a parameter phase")
        copies = copy.deepcopy(self.synthesis_copies)
        for p, buf in zip(copies.parameters(), self._best_copy_params):
            p.copy_(buf)
        return copies

    def evaluate_final_iterate(self) -> None:
        super().evaluate_final_iterate()
        if self.phase == "latent":
            lead = self.leading_restart()
            self.latent_phase_best_loss.copy_(self.restart_best_loss[lead])
            self.latent_phase_images.copy_(self.restart_best_images[lead])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gias"] = {"step_count": self.step_count, "phase": self.phase, "switched": self._switched}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("gias", {})
        self.step_count = int(state.get("step_count", 0))
        self.phase = state.get("phase", self.phase)
        self._switched = bool(state.get("switched", False))

    @torch.no_grad()
    def reconstruction(self) -> dict[str, Any]:
        out = super().reconstruction()
        to_img = self.inputs.to_image_space
        out.update(
            {
                "phase": self.phase,
                "steps": self.step_count,
                "latent_phase_matching_distance": float(self.latent_phase_best_loss),
                "latent_phase_images": to_img(self.latent_phase_images).clamp(0, 1).detach().cpu().float(),
                "restart_losses": [float(v) for v in self.restart_best_loss],
                "latent_phase_best_step": int(self.best_step[self.leading_restart()]),
                "best_restart": int(self.leading_restart()),
                "latents": self.best_latents[self.leading_restart()].detach().cpu(),
            }
        )
        return out
