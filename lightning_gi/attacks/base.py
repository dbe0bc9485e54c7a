"""The shared base of every gradient-inversion attack: a LightningModule whose parameters are the unknowns.

One training step evaluates the matching objective at the current unknowns:

    dummy batch -> victim forward -> autograd.grad(create_graph=True) -> gradient distance (+ priors)

and the optimiser (``configure_optimizers``) updates only the unknowns. The victim is held outside the
module tree (it is not a parameter of the attack and is never saved in attack checkpoints); its parameters
require grad only so that ``autograd.grad`` can differentiate with respect to them. ``backward`` is
overridden to differentiate with respect to the unknowns only, which spares the second-order gradient of
the frozen victim (1.3x on ResNet-18, see docs/performance_notes.md).

The best iterate (lowest matching distance seen) is tracked on device without a host sync and is what
:meth:`reconstruction` returns. Schedules (:mod:`lightning_gi.callbacks.schedules`) may weight or mask the
gradient tensors of the *optimised* distance; the best iterate is always scored, and the reported
``matching_distance`` always computed, by :meth:`scoring_distance`: the attack's distance over every tensor
(no schedule weights) without dropout masks, so that every step (and the final iterate) is compared like with
like and the reported number is the plain distance of the returned reconstruction.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..client import ThreatModel, own_parameter_gradient
from ..labels import LabelStrategy
from ..objectives.distances import squared_l2
from ..objectives.matching import MatchingObjective
from ..observation import GradientObservation
from ..victim.datamodule import AttackInputs
from .label_slots import LabelSlotSearch

INIT_CHOICES = ("randn", "rand", "half", "zeros")
RESTART_MODES = ("auto", "sequential", "vectorised")
RestartMode = Literal["auto", "sequential", "vectorised"]


def _default_lbfgs(params: Any) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(params, lr=1.0, max_iter=20, history_size=100)


class _WithGradient(torch.autograd.Function):
    """``value`` in forward; in backward, ``grad_output * gradient`` for ``inputs`` (a gradient computed already)."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, value: Tensor, gradient: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gradient)
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (gradient,) = ctx.saved_tensors
        return grad_output * gradient, None, None


def _pick(stacked: Tensor, index: Tensor) -> Tensor:
    """``stacked[index]`` for a 0-d index tensor without a host sync (plain indexing calls ``.item()``)."""
    return stacked.index_select(0, index.reshape(1)).squeeze(0)


class GradientInversionAttack(pl.LightningModule):
    """Base class. Subclasses define the unknowns (:meth:`create_unknowns`) and how they map to a dummy
    batch (:meth:`dummy_batch`).

    Args:
        optimizer: factory for the optimiser over the unknowns (``class_path: torch.optim.LBFGS``...).
        lr_scheduler: optional factory for a scheduler of that optimiser.
        label_strategy: how labels are recovered from the observation (None when the attack optimises them).
        init: initial dummy images: "randn" (standard normal in the victim's input space, as DLG),
            "rand" (uniform [0,1] image), "half" (grey 0.5 image), "zeros" (zeros in input space).
        seed: seed of the initialisation, independent of the global seed.
        distance: gradient distance ``f(dummy_grads, target_grads, weights, masks) -> scalar``.
        steps_per_call: optimiser steps per ``training_step`` (default 1). Above 1 the attack switches to
            manual optimisation and runs that many steps per call, which amortises the Trainer's fixed cost
            per call (~1-3 ms) for tiny victims; iterates equal those of one step per call. Callbacks that act
            per batch (schedules, monitors, the divergence guard) then see every ``steps_per_call``-th step,
            so keep their periods multiples of it. With L-BFGS, ``steps_per_call: 1`` (default) keeps automatic
            optimisation; above 1 each closure evaluation is the one automatic optimisation runs, so the iterates
            still equal plain PyTorch L-BFGS.
        compile: evaluate the matching step (victim forward -> autograd.grad(create_graph) -> distance ->
            priors) through ``torch.compile`` with ``torch._dynamo.config.trace_autograd_ops = True``;
            schedule weights, masks and prior weights are passed as tensors so that changing them does not
            recompile. Off by default: the first step pays a cold compile of tens of seconds to minutes. On a CPU
            inductor's channels-last layout optimisation is switched off (:meth:`compile_options`): with it the
            ResNet-18 step was slower than eager and 1.5e-4 (relative) away from it; without it, 1.56x eager per
            evaluation and within 1e-6 (see docs/performance_notes.md). Not yet measured on a GPU.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_lbfgs,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        label_strategy: Optional[LabelStrategy] = None,
        init: str = "randn",
        seed: int = 0,
        distance: Optional[Callable[..., Any]] = None,
        steps_per_call: int = 1,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
        if int(steps_per_call) != steps_per_call or steps_per_call < 1:
            raise ValueError(f"steps_per_call must be a positive integer, got {steps_per_call!r}")
        self.steps_per_call = int(steps_per_call)
        self.compile = bool(compile)
        if self.steps_per_call > 1:
            self.automatic_optimization = False
        self._compiled_step: Optional[Callable[..., Any]] = None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.label_strategy = label_strategy
        self.init = init
        self.seed = seed
        self.priors = nn.ModuleList()
        # The public matching objective: targets, distance, schedule weights/masks, priors (lightning_gi.objectives.
        # matching). Schedules and guards change it only through its methods; reset_best() restarts best tracking.
        self.objective = MatchingObjective(distance if distance is not None else squared_l2, self.priors)
        self.objective.on_reset_best(self.reset_best)
        # Restarts: R independent initialisations; the core sees every attack's dummy images as [R, N, ...]
        # (restart_images()), keeps a best iterate per restart and returns the winner. R = 1 unless a subclass says.
        self.restarts = 1
        self.restart_mode: RestartMode = "sequential"
        self.vectorised_restarts = False  # resolved in bind() (resolve_restart_mode)
        self.restart_span: Optional[tuple[int, int, int]] = None  # (start, stop, total) of the restarts kept here
        self._vmap_distance: Optional[bool] = None
        self._inputs: Optional[AttackInputs] = None
        self._victim_params: list[Tensor] = []
        self._unknowns: list[nn.Parameter] = []
        self._last_logged_step = -1
        # Multi-process: what this rank owns (lightning_gi.distributed.Shard), set in setup() by a gi_shard /
        # gi_restarts strategy; None (the default) means this process runs the whole inversion.
        self.shard: Optional[Any] = None
        # What the client computed and shared (read from the observation in bind(); settable before bind() for an
        # observation whose metadata does not say), and how recovered labels are placed into its slots.
        self.threat_model = ThreatModel()
        self.threat_model_given: Optional[ThreatModel] = None  # set before bind() when the metadata does not say
        self.label_slots = LabelSlotSearch()

    # ------------------------------------------------------------------ binding the victim
    @property
    def inputs(self) -> AttackInputs:
        if self._inputs is None:
            raise RuntimeError("the attack is not bound to a victim: use a VictimDataModule or call bind()")
        return self._inputs

    @property
    def victim(self) -> nn.Module:
        return self.inputs.model

    @property
    def observation(self) -> GradientObservation:
        return self.inputs.observation

    @property
    def batch_size(self) -> int:
        return self.observation.batch_size

    def setup(self, stage: str) -> None:
        if self._inputs is None:
            dm = self.trainer.datamodule if self._trainer is not None else None
            if dm is None or not hasattr(dm, "attack_inputs"):
                raise RuntimeError("the attack needs a VictimDataModule (data:) or an explicit bind(inputs)")
            dm.setup(stage)
            device = self.trainer.strategy.root_device
            make_shard = getattr(self.trainer.strategy, "make_shard", None)  # lightning_gi.distributed strategies
            self.shard = make_shard() if make_shard is not None else None
            self.bind(dm.attack_inputs(), device=device)

    def bind(self, inputs: AttackInputs, device: Optional[torch.device] = None) -> "GradientInversionAttack":
        """Attach the victim and the observation, recover labels, create the unknowns (once)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        inputs.observation.check_against(inputs.model, inputs.num_classes)
        model = inputs.model.to(device)
        for p in model.parameters():
            p.requires_grad_(True)
        self._inputs = inputs
        self.threat_model = self.read_threat_model(inputs.observation)
        self.vectorised_restarts = self.resolve_restart_mode(model, device)
        self._victim_params = list(model.parameters())
        scale = self.threat_model.pseudo_gradient_scale
        self.objective.set_targets(
            [g.to(device=device, dtype=p.dtype) * scale for g, p in zip(inputs.observation.gradients, self._victim_params)]
        )
        self.loss_reduction = inputs.observation.loss_reduction
        labels = self.recover_labels()
        if labels is not None:
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= inputs.num_classes):
                raise ValueError(f"recovered labels {labels.tolist()} are outside [0, {inputs.num_classes})")
            self.register_buffer("labels", labels.to(device))
        gen = torch.Generator().manual_seed(self.seed)
        self.create_unknowns(gen)
        if self.shard is not None:
            self.shard.localise_unknowns(self)  # the shard calls keep_restarts / reseed_unknowns (ShardableAttack)
        self._unknowns = [p for p in self.parameters() if p.requires_grad]
        for prior in self.priors:
            if hasattr(prior, "attach"):
                prior.attach(model)
        if self.label_slots.applies(self):
            self.label_slots.search(self, gen)
        self.to(device)
        self.init_best()
        return self

    # ------------------------------------------------------------------ the distributed protocol (ShardableAttack)
    @property
    def supports_batch_sharding(self) -> bool:
        """Whether the dummy batch may be split over processes: the attack uses the core's victim gradients."""
        return type(self).victim_gradients is GradientInversionAttack.victim_gradients

    @property
    def has_restart_dimension(self) -> bool:
        """True when the unknowns carry the leading restart dimension (R initialisations side by side)."""
        images = getattr(self, "dummy_images", None)
        return isinstance(images, Tensor) and images.dim() == len(self.inputs.image_shape) + 2

    def keep_restarts(self, start: int, stop: int) -> None:
        """Keep restarts ``[start, stop)`` of the R drawn ones (restarts over ranks); needs a restart dimension."""
        if not self.has_restart_dimension:
            raise ValueError(f"{type(self).__name__} has no restart dimension to split")
        total = self.restarts
        self.dummy_images = nn.Parameter(self.dummy_images.detach()[start:stop].clone())
        self.restarts = stop - start
        self.restart_span = (start, stop, total)

    def reseed_unknowns(self, seed: int) -> None:
        """Create the unknowns afresh from ``seed`` (one restart per process group for attacks without restarts)."""
        self.create_unknowns(torch.Generator().manual_seed(int(seed)))
        self.restart_span = None

    def read_threat_model(self, observation: GradientObservation) -> ThreatModel:
        """What the client computed and shared: :attr:`threat_model_given` when set (an observation captured without
        the metadata), else read from the observation's metadata (absent keys: one FedSGD client). Every attack
        matches the simulated shared update of its dummy batch under this threat model."""
        given = self.threat_model_given
        if given is not None:
            if sum(given.sizes(observation.batch_size)) != observation.batch_size:
                raise ValueError(
                    f"the given threat model's client_batch_sizes {given.client_batch_sizes} do not sum to the "
                    f"observation's batch_size {observation.batch_size}"
                )
            return given
        try:
            return ThreatModel.from_metadata(observation.metadata, observation.batch_size)
        except ValueError as err:
            raise ValueError(f"the observation's threat-model metadata is inconsistent: {err}") from None

    def pseudo_gradient_observation(self) -> GradientObservation:
        """The observation as a gradient-scale quantity (a FedAvg update divided by ``-local_lr``: one local step
        then IS the FedSGD gradient), what label rules read; the observation itself for FedSGD."""
        obs = self.observation
        scale = self.threat_model.pseudo_gradient_scale
        if scale == 1.0:
            return obs
        return GradientObservation(
            gradients=[g * scale for g in obs.gradients], batch_size=obs.batch_size, labels=obs.labels,
            param_names=obs.param_names, loss_reduction=obs.loss_reduction, metadata=dict(obs.metadata),
            buffers=obs.buffers,
        )

    def assign_labels(self, order: Sequence[int], images: Optional[Tensor] = None) -> None:
        """Permute the fixed labels into the slot order ``order`` (the label-to-slot search's result); ``images``
        ([N, C, H, W], the images that go with them) warm-start the unknowns when those are plain dummy images
        of that shape."""
        self.labels = self.labels[list(order)]
        current = getattr(self, "dummy_images", None)
        if images is not None and isinstance(current, nn.Parameter) and current.shape == images.shape:
            with torch.no_grad():
                current.copy_(images.to(current))

    def update_distance(self, images: Tensor, labels: Tensor) -> float:
        """The scoring distance of (images, labels)' simulated update, without a graph (inf when not finite)."""
        with torch.enable_grad():
            grads = self.victim_gradients(images.detach(), labels)
        value = float(self.scoring_distance([g.detach() for g in grads]))
        return value if math.isfinite(value) else math.inf

    def recover_labels(self) -> Optional[Tensor]:
        if self.label_strategy is None:
            return None
        self.label_strategy.adopt_input_normalisation(self.inputs.mean.flatten().tolist(), self.inputs.std.flatten().tolist())
        return self.label_strategy(self.pseudo_gradient_observation(), self.victim)

    def initial_images(self, generator: torch.Generator) -> Tensor:
        """A dummy batch in the victim's input space, drawn from ``generator`` per :attr:`init`.

        Under batch sharding the FULL batch is drawn (the same random stream on every rank) and this rank's
        slice (:attr:`local_slice`) is returned."""
        shape = (self.batch_size, *self.inputs.image_shape)
        if self.init == "randn":
            images = torch.randn(shape, generator=generator)
        elif self.init == "zeros":
            images = torch.zeros(shape)
        else:
            images = torch.rand(shape, generator=generator) if self.init == "rand" else torch.full(shape, 0.5)
            images = self.inputs.to_input_space(images)
        return images[self.local_slice]

    @property
    def batch_sharded(self) -> bool:
        """True when the dummy batch is split over processes (see lightning_gi/distributed.py)."""
        return self.shard is not None and self.shard.shards_batch

    @property
    def local_slice(self) -> slice:
        """The images of the batch this process owns (all of them unless batch-sharded)."""
        return slice(None) if self.shard is None else self.shard.batch_slice(self.batch_size)

    # ------------------------------------------------------------------ subclass API
    def create_unknowns(self, generator: torch.Generator) -> None:
        """Register the attacker's unknowns as parameters (default: the dummy images, [N, C, H, W]; with
        ``restarts > 1`` stacked as [R, N, C, H, W], restart r the r-th draw from ``generator``)."""
        if self.restarts == 1 and not self.stack_restarts:
            self.dummy_images = nn.Parameter(self.initial_images(generator))
            return
        self.dummy_images = nn.Parameter(torch.stack([self.initial_images(generator) for _ in range(self.restarts)]))

    #: subclasses with a ``restarts`` argument keep the restart dimension even for R = 1 (their outputs and
    #: checkpoints always have it); DLG/iDLG keep plain [N, ...] dummies.
    stack_restarts = False

    def restart_images(self) -> Tensor:
        """The dummy images of every restart, ``[R, N, C, H, W]``, differentiable w.r.t. the unknowns (the core
        evaluates, scores and keeps the best of each restart from this one view)."""
        images = self.dummy_images
        return images if images.dim() == len(self.inputs.image_shape) + 2 else images.unsqueeze(0)

    def current_targets(self) -> Tensor:
        """What the client's loss compares the victim's outputs with: labels ``[N]`` or soft targets ``[N, classes]``."""
        return self.labels

    def extra_terms(self) -> dict[str, Tensor]:
        """Terms on the unknowns themselves (not on images) added to the loss, e.g. a latent penalty (default none)."""
        return {}

    def dummy_batch(self) -> tuple[Tensor, Tensor]:
        """(images of the leading restart in the victim's input space, targets): what monitors and checks see."""
        images = self.restart_images()
        current = images[0] if images.shape[0] == 1 else _pick(images, self.leading_restart())
        return current, self.current_targets()

    def current_labels(self) -> Tensor:
        return self.labels

    # ------------------------------------------------------------------ restart modes
    def resolve_restart_mode(self, model: nn.Module, device: torch.device) -> bool:
        """Whether this run evaluates its restarts as one vmapped computation (see ``restart_mode``): "vectorised"
        (raises when the victim or priors cannot), "sequential", or "auto" (for R > 1 when eligible: vectorised on CUDA, and
        on a CPU for small victims, :func:`~lightning_gi.attacks.vectorised.auto_vectorise`; sequential under ``compile``,
        which compiles the per-restart step)."""
        from .vectorised import auto_vectorise, vectorisable

        if self.restart_mode not in RESTART_MODES:
            raise ValueError(f"restart_mode must be one of {RESTART_MODES}, got {self.restart_mode!r}")
        single = self.threat_model.is_single_gradient
        if self.restart_mode == "vectorised":
            if self.compile:
                raise ValueError("compile=True compiles the per-restart step, which restart_mode 'vectorised' does not run: "
                                 "use restart_mode 'sequential' or 'auto' with compile")
            reason = vectorisable(model, list(self.priors)) if single else "vectorised restarts support one FedSGD gradient"
            if reason is not None:
                raise ValueError(reason)
            return True
        if self.restart_mode == "sequential" or not single or self.compile:
            return False
        return auto_vectorise(device, self.restarts, model, list(self.priors))

    # ------------------------------------------------------------------ the objective
    def victim_gradients(self, images: Tensor, targets: Tensor) -> list[Tensor]:
        """The shared update the client would send for the dummy batch, kept differentiable (create_graph):
        one FedSGD gradient (the fast path), or :meth:`lightning_gi.client.ThreatModel.simulate` (FedAvg local
        steps, several clients) scaled like the targets (:attr:`ThreatModel.pseudo_gradient_scale`)."""
        tm = self.threat_model
        if not tm.is_single_gradient:
            if self.batch_sharded:
                raise ValueError(
                    f"batch sharding (gi_shard) supports one FedSGD gradient; the observation is a "
                    f"{tm.threat_model} update of {len(tm.sizes(self.batch_size))} client(s): use gi_restarts or one process"
                )
            update = tm.simulate(self.victim, images, targets, params=self._victim_params, create_graph=True)
            scale = tm.pseudo_gradient_scale
            return [u * scale for u in update] if scale != 1.0 else update
        reduction = "sum" if self.batch_sharded else self.loss_reduction  # sharded: sum, all-reduce, / N
        if self.batch_sharded:
            self.shard.check_local_batch(images.shape[0], self.batch_size, self)
            if targets.shape[0] != images.shape[0]:
                targets = targets[self.local_slice]  # full-batch labels, this rank's images
        # client_gradient's hot path without its per-call check: bind() listed the victim's own parameters and made
        # them require grad (a parameter replaced or frozen since then makes autograd.grad raise, never a silent mix)
        grads = own_parameter_gradient(self.victim, images, targets, self._victim_params, reduction)
        return self.reduce_gradients(grads)

    def reduce_gradients(self, grads: list[Tensor]) -> list[Tensor]:
        """Hook between ``autograd.grad`` and the distance: identity in one process; batch-sharded, the
        differentiable all-reduce of the shards' summed gradients, divided by N for a mean-reduced loss."""
        if not self.batch_sharded:
            return grads
        return self.shard.reduce_gradients(grads, float(self.batch_size) if self.loss_reduction == "mean" else 1.0)

    def matching_distance(self, dummy_gradients: Sequence[Tensor]) -> Tensor:
        """The distance that is optimised: :meth:`MatchingObjective.optimised` (with the schedules' current weights
        and masks; the target-only parts prepared once per change)."""
        return self.objective.optimised(dummy_gradients)

    @property
    def distance(self) -> Callable[..., Any]:
        """The gradient distance ``f(dummy, target, weights, masks)`` (held by :attr:`objective`)."""
        return self.objective.distance

    @property
    def gradient_weights(self) -> Optional[list[float]]:
        """Read-only view of :attr:`MatchingObjective.weights` (change it with ``objective.set_weights``)."""
        return self.objective.weights

    @property
    def gradient_masks(self) -> Optional[list[Optional[Tensor]]]:
        """Read-only view of :attr:`MatchingObjective.masks` (change it with ``objective.set_masks``)."""
        return self.objective.masks

    @property
    def _target_gradients(self) -> list[Tensor]:  # kept for code written before the objective object
        return self.objective.targets

    @property
    def scheduled(self) -> bool:
        """True when a schedule currently weights or masks the gradient tensors of the optimised distance."""
        return self.objective.scheduled

    def scoring_distance(self, dummy_gradients: Sequence[Tensor]) -> Tensor:
        """The distance that scores iterates and is reported: every tensor, no schedule weights, no masks (detached)."""
        return self.objective.score(dummy_gradients)

    def unscheduled(self) -> Any:
        """Within the block :meth:`matching_distance` ignores the schedules (restored afterwards)."""
        return self.objective.unscheduled()

    def prior_terms(self, images: Tensor) -> dict[str, Tensor]:
        """Weighted prior values by name (priors with weight 0 are skipped, so schedules cost nothing)."""
        terms = {}
        for prior in self.priors:
            w = float(getattr(prior, "weight", 1.0))
            if w != 0.0:
                terms[type(prior).__name__] = w * self.evaluate_prior(prior, images)
        return terms

    def evaluate_prior(self, prior: nn.Module, images: Tensor) -> Tensor:
        """``prior(images)``; batch-sharded, the prior's value on the full batch (all-reduced, every rank)."""
        if self.shard is None:
            return prior(images)
        return self.shard.evaluate_prior(prior, images, self.batch_size)

    def batch_objective(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], list[Tensor]]:
        """(loss, matching distance, prior terms, victim gradients) of one dummy batch: the loss is the optimised
        (scheduled) distance plus the weighted priors, evaluated right after this batch's victim forward; the
        returned matching distance is the one that scores iterates (:meth:`scoring_distance`, detached) when a
        schedule is active, else the optimised distance itself (the same number, no extra cost)."""
        scheduled = self.scheduled
        if self.compile and self.shard is None and torch.is_grad_enabled():
            # the compiled graph is entered with a LEAF copy of the images and returns d loss / d images with the
            # loss; _WithGradient hands that gradient to the real images in backward. (Entering torch.compile with
            # a non-leaf input that needs a double backward inside lost the path to the input in torch 2.x.)
            if targets.requires_grad:
                raise ValueError(
                    "compile=True needs labels that are not optimised (e.g. DLG's label logits are): use compile=False"
                )
            leaf = images.detach().requires_grad_(True)
            prior_weights, active = self.prior_weight_tensor(images)
            loss, distance, terms, grads, grad_images = self._compiled_matching_step()(
                leaf, targets, self.objective.weight_tensor(), self.objective.masks, prior_weights, active
            )
            loss = _WithGradient.apply(images, loss, grad_images)
        else:
            grads = self.victim_gradients(images, targets)
            distance = self.matching_distance(grads)
            terms = self.prior_terms(images)
            loss = distance
            for value in terms.values():
                loss = loss + value
        if scheduled:
            distance = self.scoring_distance(grads)
        return loss, distance, terms, grads

    # ------------------------------------------------------------------ the compiled matching step
    def matching_step(
        self, images: Tensor, targets: Tensor, weights: Tensor, masks: Optional[list[Optional[Tensor]]],
        prior_weights: Optional[Tensor] = None, active: Optional[tuple[bool, ...]] = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], list[Tensor]]:
        """The step that ``compile=True`` compiles: victim forward -> autograd.grad(create_graph) -> distance
        (schedule weights as ONE tensor, so changing them does not recompile) -> weighted priors (with
        ``prior_weights``/``active`` from :meth:`prior_weight_tensor`: new prior weights do not recompile either,
        only switching a prior on or off does)."""
        grads = self.victim_gradients(images, targets)
        distance = self.objective.optimised_with(grads, weights, masks)
        if prior_weights is None or active is None:
            terms = self.prior_terms(images)
        else:
            terms = {
                type(prior).__name__: prior_weights[i] * self.evaluate_prior(prior, images)
                for i, prior in enumerate(self.priors) if active[i]
            }
        loss = distance
        for value in terms.values():
            loss = loss + value
        return loss, distance, terms, grads

    def compiled_matching_step(
        self, images: Tensor, targets: Tensor, weights: Tensor, masks: Optional[list[Optional[Tensor]]],
        prior_weights: Optional[Tensor] = None, active: Optional[tuple[bool, ...]] = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], list[Tensor], Tensor]:
        """:meth:`matching_step` for a leaf ``images``, detached outputs plus ``d loss / d images`` (what is compiled)."""
        loss, distance, terms, grads = self.matching_step(images, targets, weights, masks, prior_weights, active)
        (grad_images,) = torch.autograd.grad(loss, [images])
        return (loss.detach(), distance.detach(), {k: v.detach() for k, v in terms.items()},
                [g.detach() for g in grads], grad_images)

    def prior_weight_tensor(self, images: Tensor) -> tuple[Tensor, tuple[bool, ...]]:
        """The priors' weights as one tensor (on ``images``' device, in their dtype) and which are non-zero: what the
        compiled step takes, so that a prior schedule's new weights reuse the compiled graph. Rebuilt on change only."""
        values = tuple(float(getattr(prior, "weight", 1.0)) for prior in self.priors)
        cached = getattr(self, "_prior_weights", None)
        if cached is not None and cached[0] == values and cached[1].device == images.device and cached[1].dtype == images.dtype:
            return cached[1], cached[2]
        tensor = torch.tensor(values if values else (0.0,), dtype=images.dtype, device=images.device)
        self._prior_weights = (values, tensor, tuple(v != 0.0 for v in values))
        return tensor, self._prior_weights[2]

    def _compiled_matching_step(self) -> Callable[..., Any]:
        if self._compiled_step is None:
            import torch._dynamo

            # double backward (autograd.grad(create_graph=True) inside the graph) compiles without graph breaks
            torch._dynamo.config.trace_autograd_ops = True
            self._compiled_step = torch.compile(self.compiled_matching_step, options=self.compile_options())
        return self._compiled_step

    def compile_options(self) -> Optional[dict[str, Any]]:
        """Inductor options of the compiled step. On a CPU inductor's layout optimisation (convolutions converted to
        channels-last) is switched off: measured on ResNet-18 32 px batch 8 it made the compiled step slower than
        eager (0.9x) and moved the loss 1.5e-4 (relative) from eager; without it the compiled step ran 1.56x eager
        and agreed to 5e-7 (docs/performance_notes.md). Elsewhere inductor's defaults (not measured here)."""
        params = self._victim_params
        if params and params[0].device.type == "cpu":
            return {"layout_optimization": False}
        return None

    def evaluate(self) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """(total loss, scoring distances ``[R]``, images ``[R, N, ...]``, prior terms summed over restarts) at the
        current unknowns: THE restart loop. The total is the sum of the per-restart losses; each restart's victim
        gradient, distance and priors come from its own images alone, so ``d total / d x_r = d L_r / d x_r`` and
        element-wise update rules give every restart the trajectory it would follow alone. With
        :attr:`vectorised_restarts` the R restarts are one vmapped computation (:mod:`.vectorised`)."""
        single = None if self.vectorised_restarts else self._single_batch()
        targets = self.current_targets()
        if single is not None:  # one plain dummy batch: evaluated without the restart view (two autograd nodes less)
            total, distance, terms_sum, _ = self.batch_objective(single, targets)
            images, distances = single.unsqueeze(0), distance.reshape(1)
            for name, value in self.extra_terms().items():
                terms_sum[name] = value
                total = total + value
            return total, distances, images, terms_sum
        images = self.restart_images()
        if self.vectorised_restarts:
            from .vectorised import vectorised_objective

            total, distances, terms_sum = vectorised_objective(self, images, targets)
        elif images.shape[0] == 1:
            total, distance, terms_sum, _ = self.batch_objective(images[0], targets)
            distances = distance.reshape(1)
        else:
            total = None
            stacked = []
            terms_sum = {}
            for r in range(images.shape[0]):
                loss, distance, terms, _ = self.batch_objective(images[r], targets)
                total = loss if total is None else total + loss
                stacked.append(distance)
                for name, value in terms.items():
                    terms_sum[name] = value if name not in terms_sum else terms_sum[name] + value
            distances = torch.stack(stacked)
        for name, value in self.extra_terms().items():
            terms_sum[name] = value
            total = total + value
        return total, distances, images, terms_sum

    def _single_batch(self) -> Optional[Tensor]:
        """The unknowns themselves when they are ONE plain dummy batch ``[N, C, H, W]`` (no restart dimension, the
        core's :meth:`restart_images`), else None: :meth:`evaluate` then skips the ``[1, N, ...]`` view and its index."""
        if type(self).restart_images is not GradientInversionAttack.restart_images:
            return None
        images = self._parameters.get("dummy_images")
        if images is None or images.dim() != len(self.inputs.image_shape) + 1:
            return None
        return images

    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        if not self.automatic_optimization and self.steps_per_call > 1:
            return self.multi_step()
        return self.single_step()

    def single_step(self) -> Tensor:
        """One evaluation of the objective (automatic optimisation: Lightning runs backward and the step)."""
        loss, distance, images, terms = self.evaluate()
        self.update_best(distance.detach(), images.detach())
        if self._should_log():
            self.log_step(distance.detach(), terms)
        return loss

    def log_step(self, distance: Tensor, terms: dict[str, Tensor]) -> None:
        """What a logger step records (only called on the logger's steps, see :meth:`_should_log`): the best
        restart's distance and the prior terms per restart."""
        r = distance.numel()
        self.log("matching_distance", distance.detach().min() if r > 1 else distance.detach().reshape(()), prog_bar=True)
        for name, value in terms.items():
            self.log(f"prior/{name}", value.detach() / r if r > 1 else value.detach())

    def steps_this_call(self) -> int:
        """Optimiser steps the next :meth:`multi_step` runs: ``steps_per_call``, fewer at the end of the budget."""
        k = self.steps_per_call
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is not None and max_steps > 0:
            k = max(1, min(k, max_steps - self.trainer.global_step))
        return k

    def multi_step(self) -> Tensor:
        """``steps_per_call`` optimiser steps in one ``training_step`` (manual optimisation), each exactly the
        step automatic optimisation would take: zero_grad, objective, best-iterate update (on device),
        backward w.r.t. the unknowns, ``on_before_optimizer_step`` (e.g. signed gradients), the optimiser step,
        :meth:`after_optimizer_step` (e.g. the box), and the scheduler's per-step update. No host sync.

        When nothing else needs Lightning's per-step machinery (32-bit precision on one device, no callback
        hooked on backward or the optimiser step) the inner steps call the optimiser directly and only count
        the step for ``trainer.global_step``; otherwise they go through ``manual_backward`` and Lightning's
        optimiser wrapper, which call every hook."""
        lopt = self.optimizers()
        raw = getattr(lopt, "optimizer", lopt)
        sched = self.lr_schedulers()
        k = self.steps_this_call()
        log = self._should_log(self.steps_per_call)
        fast = self._direct_steps_allowed()
        if isinstance(raw, torch.optim.LBFGS):
            return self._multi_step_closure(lopt, raw, sched, k, log, fast)
        loss = None
        for i in range(k):
            raw.zero_grad(set_to_none=True)
            loss, distance, images, terms = self.evaluate()
            self.update_best(distance.detach(), images.detach())
            if log and i == 0:
                self.log_step(distance.detach(), terms)
            if fast:
                self.backward(loss)
                lopt._on_before_step()  # counts the step (trainer.global_step)
                self.on_before_optimizer_step(raw)
                raw.step()
                lopt._on_after_step()
            else:
                self.manual_backward(loss)
                lopt.step()
            self.after_optimizer_step()
            if sched is not None:
                sched.step()
        return loss.detach()

    def _multi_step_closure(self, lopt: Any, raw: torch.optim.Optimizer, sched: Any, k: int, log: bool, fast: bool) -> Tensor:
        """:meth:`multi_step` for closure optimisers (L-BFGS): each closure evaluation is what automatic
        optimisation evaluates (zero_grad, objective, best-iterate update, backward, ``on_before_optimizer_step``),
        so the iterates equal plain PyTorch L-BFGS."""
        closure = self._direct_closure(raw, log, manual=not fast)

        loss = None
        for _ in range(k):
            if fast:
                lopt._on_before_step()
                loss = raw.step(closure)
                lopt._on_after_step()
            else:
                loss = lopt.step(closure=closure)
            self.after_optimizer_step()
            if sched is not None:
                sched.step()
        return loss.detach()

    def _direct_closure(self, raw: torch.optim.Optimizer, log: bool = False, manual: bool = False) -> Callable[[], Tensor]:
        """One closure evaluation without Lightning's per-evaluation hooks (only where
        :meth:`_direct_steps_allowed`): zero_grad, objective, best-iterate update (on device), backward w.r.t. the
        unknowns, ``on_before_optimizer_step``: the operations automatic optimisation runs, in its order of effect.
        ``log``: the first evaluation logs (:meth:`log_step`). ``manual``: backward through ``manual_backward``
        instead (manual optimisation where direct steps are not allowed; the optimiser wrapper runs the hooks)."""
        pending_log = [log]

        def closure() -> Tensor:
            raw.zero_grad(set_to_none=True)
            loss, distance, images, terms = self.evaluate()
            self.update_best(distance.detach(), images.detach())
            if pending_log[0]:
                self.log_step(distance.detach(), terms)
                pending_log[0] = False
            if manual:
                self.manual_backward(loss)
            else:
                self.backward(loss)
                self.on_before_optimizer_step(raw)
            return loss

        return closure

    def _direct_steps_allowed(self) -> bool:
        cached = getattr(self, "_direct_steps", None)
        if cached is not None and cached[0] == id(self.trainer):
            return cached[1]
        from pytorch_lightning.plugins.precision import Precision
        from pytorch_lightning.strategies import SingleDeviceStrategy
        from pytorch_lightning.utilities.model_helpers import is_overridden

        trainer = self.trainer
        hooks = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")
        own = ("on_before_backward", "on_after_backward", "on_before_zero_grad", "optimizer_zero_grad")
        ok = (
            type(trainer.precision_plugin) is Precision
            and isinstance(trainer.strategy, SingleDeviceStrategy)
            and not any(is_overridden(h, cb, pl.Callback) for cb in trainer.callbacks for h in hooks)
            and not any(is_overridden(h, self, GradientInversionAttack) for h in own)
            and not trainer.gradient_clip_val  # clipping happens in Lightning's wrapper
            and trainer.accumulate_grad_batches == 1
            and hasattr(self.optimizers(), "_on_before_step")
        )
        self._direct_steps = (id(trainer), ok)
        return ok

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (automatic and manual); e.g. projections of the unknowns."""

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Optional[Callable[[], Any]] = None) -> None:
        """Automatic optimisation's step. For a closure optimiser (L-BFGS: about 20 objective evaluations per step)
        where :meth:`_direct_steps_allowed`, only the FIRST evaluation runs through Lightning's closure
        (``training_step``, its hooks, the step's recorded loss and logs); the others run :meth:`_direct_closure`,
        which does the same operations without Lightning's ~10 hook calls per evaluation. The iterates are those of
        plain PyTorch L-BFGS either way (``tests/attacks/test_dlg.py``)."""
        raw = getattr(optimizer, "optimizer", optimizer)
        if optimizer_closure is not None and isinstance(raw, torch.optim.LBFGS) and self._direct_steps_allowed():
            direct = self._direct_closure(raw)
            first = [True]

            def closure() -> Any:
                if first[0]:
                    first[0] = False
                    loss = optimizer_closure()
                    self.on_before_optimizer_step(raw)  # what Lightning's precision plugin calls after its closure
                    return loss
                return direct()

            optimizer._on_before_step()
            raw.step(closure)
            optimizer._on_after_step()
        else:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.after_optimizer_step()

    def _should_log(self, steps: int = 1) -> bool:
        """``self.log`` costs milliseconds per call (Lightning's result collection): call it only on the
        steps the logger writes (``trainer.log_every_n_steps``), once per step even under L-BFGS. Under
        ``steps_per_call > 1`` Lightning writes logs per call (batch), so its own per-batch rule decides."""
        if self._trainer is None:
            return False
        step = self.trainer.global_step
        if step == self._last_logged_step:
            return False
        if steps > 1:
            connector = getattr(self.trainer, "_logger_connector", None)
            write = bool(connector.should_update_logs) if connector is not None else True
        else:
            write = step % max(1, self.trainer.log_every_n_steps) == 0
        if write:
            self._last_logged_step = step
        return write

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Differentiate only with respect to the unknowns (not the frozen victim's parameters)."""
        loss.backward(inputs=self._unknowns)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self._unknowns)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ best iterate and outputs (the core)
    def best_state(self) -> dict[str, Tensor]:
        """Extra tensors that belong to the best iterate (e.g. DLG's label logits), kept in ``best_<name>``
        buffers; with R > 1 their leading dimension is the restart."""
        return {}

    def init_best(self) -> None:
        """Per-restart best iterates (``restart_best_loss [R]``, ``restart_best_images [R, N, ...]``) and the
        leading restart's (``best_loss``, ``best_images``), on the unknowns' device."""
        with torch.no_grad():
            images = self.restart_images().detach()
        r = images.shape[0]
        self.register_buffer("restart_best_loss", torch.full((r,), math.inf, device=images.device))
        self.register_buffer("restart_best_images", images.clone())
        self.register_buffer("best_loss", torch.tensor(math.inf, device=images.device))
        self.register_buffer("best_images", images[0].clone())

    def reset_best(self) -> None:
        """Restart best tracking (``objective.reset_best()`` calls this): the next scored iterate is kept."""
        for name in ("best_loss", "restart_best_loss"):
            best = getattr(self, name, None)
            if isinstance(best, Tensor):
                with torch.no_grad():
                    best.fill_(math.inf)

    def leading_restart(self) -> Tensor:
        """Index (0-d tensor, no host sync) of the restart with the lowest kept matching distance."""
        return torch.argmin(self.restart_best_loss)

    def update_best(self, distance: Tensor, images: Tensor) -> None:
        """Per restart, keep the iterate with the lowest scoring distance (NaN never wins); no host sync.
        ``distance [R]`` and ``images [R, N, ...]`` (a 0-d distance and ``[N, ...]`` images for R = 1)."""
        if distance.dim() == 0:
            distance, images = distance.reshape(1), images.unsqueeze(0)
        buffers = self._buffers  # the registered buffers, replaced directly (Module.__setattr__ costs ~4 us each)
        kept = buffers["restart_best_loss"]
        better = distance < kept
        r = distance.shape[0]
        cond = better.reshape(()) if r == 1 else better.view(-1, *([1] * (images.dim() - 1)))
        buffers["restart_best_loss"] = kept = torch.where(better, distance, kept)
        buffers["restart_best_images"] = kept_images = torch.where(cond, images, buffers["restart_best_images"])
        for name, value in self.best_state().items():
            c = cond if r == 1 else better.view(-1, *([1] * (value.dim() - 1)))
            buffers[f"best_{name}"] = torch.where(c, value.detach(), buffers[f"best_{name}"])
        if r == 1:  # views: no kernel
            buffers["best_loss"], buffers["best_images"] = kept.squeeze(0), kept_images.squeeze(0)
        else:
            leader = torch.argmin(kept)
            buffers["best_loss"], buffers["best_images"] = _pick(kept, leader), _pick(kept_images, leader)

    def final_distances(self, images: Tensor, targets: Tensor) -> Tensor:
        """Scoring distances ``[R]`` of ``images [R, N, ...]`` (no graph kept beyond the victim gradients)."""
        if self.vectorised_restarts:
            from .vectorised import vectorised_final_distances

            return vectorised_final_distances(self, images, targets)
        return torch.stack([self.scoring_distance(self.victim_gradients(images[r], targets)) for r in range(images.shape[0])])

    def evaluate_final_iterate(self) -> None:
        """The optimiser's last step is never evaluated inside training_step: score it once (scoring distance)."""
        with torch.inference_mode(False), torch.enable_grad():
            images = self.restart_images()
            distances = self.final_distances(images, self.current_targets())
        self.update_best(distances.detach(), images.detach())

    def on_train_epoch_end(self) -> None:
        """Score the last iterate when the loop stops (max_steps ends the one endless epoch), before the
        callbacks' ``on_train_end`` writes the reconstruction. The schedules' weights and masks are set aside
        meanwhile, so even a subclass that scores with :meth:`matching_distance` scores like the run did."""
        with self.unscheduled():
            self.evaluate_final_iterate()

    def best_labels(self) -> Tensor:
        return self.labels

    def gather_batch(self, images: Tensor) -> Tensor:
        """All shards of a per-image tensor, in order (identity in one process). Collective: every rank calls it."""
        return images if self.shard is None else self.shard.gather_batch(images)

    def gathered_reconstruction(self) -> dict[str, Any]:
        """:meth:`reconstruction` over all processes: shards stitched in order, the best restart group kept.
        Collective under a gi_shard/gi_restarts strategy: every rank must call it (rank 0 then writes)."""
        rec = self.reconstruction()
        return rec if self.shard is None else self.shard.gather_reconstruction(rec, self)

    @torch.no_grad()
    def reconstruction(self) -> dict[str, Any]:
        """The best iterate of the winning restart in [0,1] image space with its labels, every restart's kept
        distance and, for R > 1, every restart's kept images (what the attack outputs)."""
        images = self.inputs.to_image_space(self.best_images).clamp(0, 1)
        out: dict[str, Any] = {
            "images": images.detach().cpu().float(),
            "labels": self.best_labels().detach().cpu().long(),
            "matching_distance": float(self.best_loss),
        }
        if self.has_restart_dimension:
            out["best_restart"] = int(self.leading_restart())
            out["restart_losses"] = [float(v) for v in self.restart_best_loss]
            if self.restart_best_images.shape[0] > 1:
                out["restart_images"] = self.inputs.to_image_space(self.restart_best_images).clamp(0, 1).detach().cpu().float()
        return out
