"""Scaling one inversion over processes: batch sharding, restarts over ranks, a differentiable all-reduce.

Batch sharding (``trainer.strategy: gi_shard``)
-----------------------------------------------
With G ranks, rank k owns the images ``[start_k, stop_k)`` of the N-image dummy batch (``N // G`` each, the
first ``N % G`` ranks one more). Every rank draws the FULL seeded initial batch and keeps its slice, so the
run starts where the single-process run starts. Each step, rank k

1. runs the victim on its shard with the SUM-reduced client loss and takes ``autograd.grad(create_graph)``;
2. flattens the per-parameter gradients and all-reduces them with :func:`all_reduce_sum` (forward: SUM over
   ranks; backward: the incoming gradient passed through unchanged), then divides by N when the client's loss
   was mean-reduced: this is exactly the full-batch gradient;
3. computes the gradient distance and the priors (also all-reduced, see below), so EVERY rank holds the same
   loss, and differentiates it with respect to its own shard only.

Why the backward is the identity: every rank computes ``L(S)`` with ``S = sum_k s_k(x_k)``; the true gradient
for rank k is ``L'(S) ds_k/dx_k``, and ``L'(S)`` is already identical on all ranks.
``torch.distributed.nn.functional.all_reduce`` all-reduces in backward too, which makes the shard gradients
exactly G times too large (docs/performance_notes.md).

Priors under sharding (:meth:`Shard.evaluate_prior`): a prior that averages over images (total variation,
the L2 image norm, any prior without ``batch_reduction = "sum"``) is the ``n_k / N``-weighted sum of the
per-shard values; a prior with ``batch_reduction = "sum"`` (or ``TotalVariation(reduction="sum")``) is the
plain sum. The BN-statistics prior pools the per-layer moments exactly (Chan's parallel formula on
``BNStatisticsPrior.layer_statistics()`` / ``layer_counts()``), so it sees the full batch's mean and biased
variance at every BatchNorm layer.

Exactness limits: the victim must not mix samples in its forward (BatchNorm in train mode does: sharding
raises), and the optimiser must be element-wise (Adam, SGD, signed Adam). L-BFGS's inner products and
stopping tests are per-rank, so ranks would diverge and could deadlock on the collectives: it is refused.

Restarts over ranks (``trainer.strategy: gi_restarts``, or ``gi_shard`` with ``restart_groups``)
-------------------------------------------------------------------------------------------------
The ranks are split into ``restart_groups`` groups of ``G / restart_groups`` ranks. Group j owns the restarts
``[start_j, stop_j)`` of the attack's R restarts (``ImagePriorAttack``'s ``restarts``; every rank draws all R
initialisations from the seed and keeps its own, so restart r is the same on any number of ranks); inside a
group the batch is sharded as above (collectives on the group's own process group). Attacks without a
restart dimension (DLG, iDLG) run one restart per group, group j with seed ``seed + j``. At the end the
reconstruction with the lowest matching distance over all groups is gathered (:meth:`Shard.gather_reconstruction`),
with every restart's loss in global restart order. No collective runs during the steps of a pure
restarts-over-ranks run, so L-BFGS is fine there.

Strategy
--------
:class:`GIShardStrategy` is Lightning's :class:`~pytorch_lightning.strategies.DDPStrategy` (same launchers,
cluster environments, SLURM/torchrun support, ``num_nodes``) whose ``configure_ddp`` does NOT wrap the module in
DistributedDataParallel: stock DDP would broadcast rank 0's dummies over the other shards at start and average
the shard gradients. It is registered as ``gi_shard`` (batch sharding), ``gi_restarts`` (restarts over ranks)
and ``gi_shard_spawn`` (batch sharding, spawn start method for single-node interactive use). The attack learns
its shard in ``setup()`` from ``strategy.make_shard()``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor, nn

__all__ = [
    "ShardableAttack",
    "AllReduceSum",
    "all_reduce_sum",
    "all_reduce_tensors",
    "split_range",
    "Shard",
    "GIShardStrategy",
    "STRATEGY_NAMES",
]

STRATEGY_NAMES = ("gi_shard", "gi_restarts", "gi_shard_spawn")


# ----------------------------------------------------------------------------------------------------
# the differentiable collective
# ----------------------------------------------------------------------------------------------------
class AllReduceSum(torch.autograd.Function):
    """``forward``: SUM all-reduce over ``group`` (on a copy); ``backward``: the gradient passed through.

    Correct when every rank evaluates the same function of the reduced value (see the module docs).
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any = None) -> Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def _active(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Differentiable SUM all-reduce (identity without an initialised process group of size > 1)."""
    if not _active(group):
        return tensor
    return AllReduceSum.apply(tensor, group)


def all_reduce_tensors(tensors: Sequence[Tensor], group: Any = None, divisor: float = 1.0) -> list[Tensor]:
    """All-reduce (SUM) a list of tensors with ONE collective per dtype, divide by ``divisor``, keep shapes."""
    tensors = list(tensors)
    if not _active(group):
        return [t / divisor for t in tensors] if divisor != 1.0 else tensors
    out: list[Optional[Tensor]] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        flat = all_reduce_sum(flat, group)
        if divisor != 1.0:
            flat = flat / divisor
        for i, piece in zip(idx, torch.split(flat, [tensors[i].numel() for i in idx])):
            out[i] = piece.view_as(tensors[i])
    return out  # type: ignore[return-value]


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` items are split in ``parts`` contiguous near-equal parts
    (the first ``n % parts`` parts get one item more, as ``torch.tensor_split``)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


# ----------------------------------------------------------------------------------------------------
# the contract between a shard and the attack
# ----------------------------------------------------------------------------------------------------
@runtime_checkable
class ShardableAttack(Protocol):
    """What :class:`Shard` reads from and asks of an attack (``GradientInversionAttack`` implements it). The shard
    never writes the attack's fields: it calls :meth:`keep_restarts` or :meth:`reseed_unknowns`."""

    seed: int
    restarts: int
    #: ``(start, stop, total)`` of the restarts this process keeps (set by keep_restarts); None: all / no restarts
    restart_span: Optional[tuple[int, int, int]]

    @property
    def batch_size(self) -> int: ...

    @property
    def victim(self) -> nn.Module: ...

    @property
    def supports_batch_sharding(self) -> bool: ...

    @property
    def has_restart_dimension(self) -> bool: ...

    def keep_restarts(self, start: int, stop: int) -> None: ...

    def reseed_unknowns(self, seed: int) -> None: ...


# ----------------------------------------------------------------------------------------------------
# what one rank owns
# ----------------------------------------------------------------------------------------------------
def _has_training_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def _prior_batch_reduction(prior: nn.Module) -> str:
    explicit = getattr(prior, "batch_reduction", None)
    if explicit is not None:
        return str(explicit)
    from .objectives.priors import TotalVariation

    if isinstance(prior, TotalVariation) and prior.reduction == "sum":
        return "sum"
    return "mean"


def _all_gather_objects(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass
class Shard:
    """The part of an inversion one rank owns.

    Ranks ``0..world_size-1`` form ``restart_groups`` groups of ``batch_world`` consecutive ranks. This rank is
    ``batch_rank`` inside group ``restart_rank``; ``group`` is the process group of its batch group (None:
    the world, when there is a single group).
    """

    rank: int
    world_size: int
    restart_groups: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if self.restart_groups < 1 or self.world_size % self.restart_groups:
            raise ValueError(
                f"restart_groups={self.restart_groups} must divide the number of processes ({self.world_size})"
            )

    # -- geometry --------------------------------------------------------------------------------------
    @property
    def batch_world(self) -> int:
        return self.world_size // self.restart_groups

    @property
    def batch_rank(self) -> int:
        return self.rank % self.batch_world

    @property
    def restart_rank(self) -> int:
        return self.rank // self.batch_world

    @property
    def shards_batch(self) -> bool:
        return self.batch_world > 1

    def batch_range(self, batch_size: int) -> tuple[int, int]:
        return split_range(batch_size, self.batch_world, self.batch_rank)

    def batch_slice(self, batch_size: int) -> slice:
        start, stop = self.batch_range(batch_size)
        return slice(start, stop)

    def restart_range(self, restarts: int) -> tuple[int, int]:
        return split_range(restarts, self.restart_groups, self.restart_rank)

    # -- hooks called by GradientInversionAttack (through the ShardableAttack protocol only) ----------------
    def localise_unknowns(self, attack: "ShardableAttack") -> None:
        """Called in ``bind`` right after ``create_unknowns``: validate, then tell the attack which restarts it keeps
        (:meth:`ShardableAttack.keep_restarts`) or which seed its group uses (:meth:`ShardableAttack.reseed_unknowns`)."""
        n = attack.batch_size
        if self.shards_batch:
            if not attack.supports_batch_sharding:
                raise ValueError(
                    f"{type(attack).__name__} computes its own victim gradients (e.g. unrolled FedAvg updates, which "
                    "mix the samples through the local steps), so its batch cannot be sharded: use gi_restarts"
                )
            if n < self.batch_world:
                raise ValueError(f"cannot shard a batch of {n} images over {self.batch_world} ranks (need N >= ranks)")
            if _has_training_batchnorm(attack.victim):
                raise ValueError(
                    "batch sharding needs a victim whose forward does not mix samples; this victim has BatchNorm "
                    "in train mode (per-shard batch statistics would change the gradient): use train_mode: false"
                )
        if self.restart_groups == 1:
            return
        if attack.has_restart_dimension:
            restarts = attack.restarts
            if restarts < self.restart_groups:
                raise ValueError(
                    f"{restarts} restarts cannot be spread over {self.restart_groups} restart groups: "
                    f"set restarts >= {self.restart_groups} (or fewer processes)"
                )
            start, stop = self.restart_range(restarts)
            attack.keep_restarts(start, stop)
        elif self.restart_rank:  # no restart dimension: one restart per group, seeded seed + group index
            attack.reseed_unknowns(int(attack.seed) + self.restart_rank)

    def check_local_batch(self, n_local: int, batch_size: int, attack: Any) -> None:
        """Refuse an attack whose dummy batch is not this rank's shard (it made its unknowns without
        ``initial_images`` / ``local_slice``): summing full batches on every rank would be silently wrong."""
        start, stop = self.batch_range(batch_size)
        if n_local != stop - start:
            raise ValueError(
                f"{type(attack).__name__} evaluates {n_local} dummy images on rank {self.rank}, but its shard has "
                f"{stop - start} of {batch_size}: this attack does not support batch sharding (gi_shard); use gi_restarts"
            )

    def reduce_gradients(self, grads: Sequence[Tensor], divisor: float) -> list[Tensor]:
        """Sum the shard gradients over the batch group (differentiable) and divide by ``divisor``."""
        if not self.shards_batch:
            return [g / divisor for g in grads] if divisor != 1.0 else list(grads)
        return all_reduce_tensors(grads, self.group, divisor)

    def evaluate_prior(self, prior: nn.Module, images: Tensor, batch_size: int) -> Tensor:
        """The prior's value on the FULL batch, identical on every rank of the batch group."""
        if not self.shards_batch:
            return prior(images)
        from .objectives.priors import BNStatisticsPrior

        if isinstance(prior, BNStatisticsPrior):
            return self._pooled_bn_prior(prior, images)
        local = prior(images)
        if _prior_batch_reduction(prior) == "mean":
            local = local * (images.shape[0] / batch_size)
        return all_reduce_sum(local, self.group)

    def _pooled_bn_prior(self, prior: Any, images: Tensor) -> Tensor:
        stats = prior.layer_statistics()
        counts = prior.layer_counts()
        means = [m for m, _ in stats]
        ref = means[0]
        count_t = torch.tensor(counts, dtype=ref.dtype, device=ref.device)
        # pass 1: pooled means (and the total counts)
        summed = all_reduce_tensors([c * m for c, m in zip(counts, means)] + [count_t], self.group)
        totals = summed[-1]
        pooled_means = [s / totals[i] for i, s in enumerate(summed[:-1])]
        # pass 2: pooled biased variances, Chan et al.: sum_k n_k (var_k + (mean_k - mean)^2) / n.
        # The pooled mean is detached here: d/d(mean) of that sum is -2 sum_k n_k (mean_k - mean) = 0.
        spread = [c * (v + (m - pm.detach()).pow(2)) for c, (m, v), pm in zip(counts, stats, pooled_means)]
        pooled_vars = [s / totals[i] for i, s in enumerate(all_reduce_tensors(spread, self.group))]
        pooled = list(zip(pooled_means, pooled_vars))
        prior.layer_statistics = lambda: pooled  # the documented override point, for this one evaluation
        try:
            return prior(images)
        finally:
            del prior.layer_statistics

    # -- gathering ---------------------------------------------------------------------------------------
    def gather_batch(self, tensor: Tensor) -> Tensor:
        """Concatenate this batch group's shards (dim 0 is the batch) in order; collective over ALL ranks."""
        if not self.shards_batch:
            return tensor
        pieces = _all_gather_objects(tensor.detach().cpu())
        lo = self.restart_rank * self.batch_world
        return torch.cat(pieces[lo : lo + self.batch_world]).to(tensor.device)

    def gather_reconstruction(self, rec: dict[str, Any], attack: Any) -> dict[str, Any]:
        """Collective over ALL ranks: stitch each group's batch shards, then keep the best group's result."""
        gathered = _all_gather_objects((rec, self.batch_range(attack.batch_size), attack.restart_span))
        groups = [gathered[g * self.batch_world : (g + 1) * self.batch_world] for g in range(self.restart_groups)]
        per_group = [self._stitch([r for r, _, _ in grp], [rng for _, rng, _ in grp], attack.batch_size) for grp in groups]
        if self.restart_groups == 1:
            return per_group[0]
        spans = [grp[0][2] for grp in groups]  # (start, stop, total) per group
        losses = [float(r["matching_distance"]) for r in per_group]
        best = min(range(len(losses)), key=lambda g: (losses[g] != losses[g], losses[g], g))  # NaN never wins
        out = dict(per_group[best])
        out["restart_group"] = best
        if any(span is None for span in spans):  # attacks without a dummy_images restart dimension: seed + group
            out["group_losses"] = losses
            out["group_restart_losses"] = [r.get("restart_losses", [r["matching_distance"]]) for r in per_group]
            return out
        start, _, total = spans[best]
        out["best_restart"] = start + int(out.get("best_restart", 0))
        restart_losses: list[float] = []
        restart_images: list[Tensor] = []
        for r, (s, e, _) in zip(per_group, spans):
            local = r.get("restart_losses", [r["matching_distance"]])
            restart_losses.extend(float(v) for v in local)
            restart_images.append(r["restart_images"] if "restart_images" in r else r["images"].unsqueeze(0))
        out["restart_losses"] = restart_losses
        if total > 1:
            out["restart_images"] = torch.cat(restart_images)
        return out

    @staticmethod
    def _stitch(recs: list[dict[str, Any]], ranges: list[tuple[int, int]], batch_size: int) -> dict[str, Any]:
        if len(recs) == 1:
            return recs[0]
        out = dict(recs[0])
        sizes = [stop - start for start, stop in ranges]
        out["images"] = torch.cat([r["images"] for r in recs])
        if all(r["labels"].shape[0] == n for r, n in zip(recs, sizes)) and sum(sizes) == batch_size:
            out["labels"] = torch.cat([r["labels"] for r in recs])  # per-shard labels (DLG's label logits)
        if "restart_images" in out:
            out["restart_images"] = torch.cat([r["restart_images"] for r in recs], dim=1)
        return out


# ----------------------------------------------------------------------------------------------------
# the strategy
# ----------------------------------------------------------------------------------------------------
class GIShardStrategy(DDPStrategy):
    """Lightning's DDP launcher/process group WITHOUT the DistributedDataParallel wrapper.

    Args:
        restart_groups: split the ranks into this many groups that each own a share of the restarts; inside a
            group the dummy batch is sharded. 1 (default): pure batch sharding; -1: one group per rank (pure
            restarts over ranks). Other arguments are DDPStrategy's (``start_method``, ``process_group_backend``,
            ``timeout``, ...).
    """

    strategy_name = "gi_shard"

    def __init__(self, *args: Any, restart_groups: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if restart_groups == 0 or restart_groups < -1:
            raise ValueError(f"restart_groups must be >= 1 or -1 (one per rank), got {restart_groups}")
        self.restart_groups = int(restart_groups)
        self._shard: Optional[Shard] = None

    def configure_ddp(self) -> None:
        """No DistributedDataParallel: the dummies of different ranks are different parameters."""

    def make_shard(self) -> Shard:
        """Called by the attack's ``setup()``: what this rank owns (creates the batch-group process groups)."""
        if self._shard is None:
            world, rank = self.world_size, self.global_rank
            groups = world if self.restart_groups == -1 else self.restart_groups
            if world % groups:
                raise ValueError(f"restart_groups={groups} must divide the number of processes ({world})")
            group = None
            per = world // groups
            if groups > 1 and per > 1 and dist.is_initialized():
                for g in range(groups):  # every rank creates every group, in the same order
                    pg = dist.new_group(list(range(g * per, (g + 1) * per)))
                    if rank // per == g:
                        group = pg
            self._shard = Shard(rank=rank, world_size=world, restart_groups=groups, group=group)
        return self._shard

    def setup(self, trainer: Any) -> None:
        module = trainer.lightning_module
        if self.world_size > 1 and hasattr(module, "shard") and getattr(module, "shard", None) is None:
            raise RuntimeError(
                f"{type(module).__name__} was bound before fit(): under the {self.strategy_name!r} strategy the attack "
                "must bind in setup() (pass the victim as a VictimDataModule to trainer.fit) so that it takes its shard"
            )
        super().setup(trainer)
        shard = getattr(module, "shard", None)
        if shard is not None and shard.shards_batch:
            for opt in self.optimizers:
                if isinstance(opt, torch.optim.LBFGS):
                    raise ValueError(
                        "L-BFGS cannot run batch-sharded (its inner products and stopping tests are per rank, so "
                        "ranks diverge and can deadlock): use an element-wise optimiser such as Adam, or "
                        "gi_restarts (restarts over ranks, no collectives during the steps)"
                    )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "gi_shard", cls, description="gradient inversion: dummy batch sharded over ranks (DDP without the wrapper)"
        )
        strategy_registry.register(
            "gi_restarts", cls, description="gradient inversion: restarts spread over ranks", restart_groups=-1
        )
        strategy_registry.register(
            "gi_shard_spawn",
            cls,
            description="gradient inversion: batch sharding, spawned processes (single node)",
            start_method="spawn",
        )


def _register() -> None:
    """Register the strategies with Lightning (idempotent). Called by :mod:`lightning_gi.strategies` when the
    package is imported (or when Lightning's strategies are first imported after it), not by the attacks."""
    for name in STRATEGY_NAMES:
        if name in StrategyRegistry:
            return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GIShardStrategy.register_strategies(StrategyRegistry)
