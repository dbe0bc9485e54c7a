"""Framework-independent pieces of update capture: turn "global weights + a client's returned weights +
the training config the server sent" into a lightning_gi observation file, and recover the client's
BatchNorm batch statistics from the running statistics it returned.

Nothing here imports an FL framework; :mod:`lightning_gi.integrations.flower` adapts Flower's messages.

What a captured file holds (and what it never holds): the client's weight delta ``w_E - w_0`` (or its
gradient, for FedSGD apps), the parameter names, the client's buffers after training (BN running
statistics, which FedAvg shares with the weights), and as metadata the hyperparameters the *server sent*
(local lr, local steps/epochs, batch size), the number of examples the client reported, the round and the
client id. No labels, no dataset indices, no client metrics (a reported training loss or accuracy is
information about the private data the attack does not need).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..observation import MAX_BATCH_SIZE, GradientObservation, ObservationError, read_torch_file, save_atomic
from ..victim.datamodule import Normalization, ObservationFileVictim

UpdateKind = Literal["weights", "gradient"]
UPDATE_KINDS = ("weights", "gradient")
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
BUFFERS_SUFFIX = ".buffers.pt"


@dataclass
class HyperparameterKeys:
    """Names under which an app's server config carries the client's training hyperparameters.

    Each field lists candidate keys, the first present wins. Flower apps conventionally use ``"lr"`` and
    ``"local-epochs"``; add your app's names here. Args:
        lr: the client's learning rate.
        local_steps: number of local SGD steps.
        local_epochs: number of local epochs (steps = epochs * ceil(num_examples / batch_size)).
        batch_size: examples per local step (absent or >= num_examples: full batch).
    """

    lr: tuple[str, ...] = ("lr", "local-lr", "learning-rate", "learning_rate", "local_lr")
    local_steps: tuple[str, ...] = ("local-steps", "local_steps")
    local_epochs: tuple[str, ...] = ("local-epochs", "local_epochs", "epochs")
    batch_size: tuple[str, ...] = ("batch-size", "batch_size", "local-batch-size", "local_batch_size")

    @staticmethod
    def first(config: Mapping[str, Any], keys: Sequence[str]) -> Any:
        for key in keys:
            if key in config:
                return config[key]
        return None


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def update_metadata(
    config: Mapping[str, Any],
    num_examples: int,
    server_round: int,
    client_id: str,
    update: UpdateKind = "weights",
    keys: Optional[HyperparameterKeys] = None,
    normalization: Optional[str] = None,
) -> dict[str, Any]:
    """Typed metadata of one captured update: every scalar the server sent (``config.<key>``) plus the keys
    :class:`~lightning_gi.victim.threat_models.UpdateSpec` reads (``threat_model``, ``local_steps``,
    ``local_lr``, ``local_batch_size``), derived from the config as :class:`HyperparameterKeys` says.
    ``normalization="none"`` records that the clients feed [0, 1] images unchanged (the app's owner knows it;
    the server's config usually does not say)."""
    if update not in UPDATE_KINDS:
        raise ValueError(f"update must be one of {UPDATE_KINDS}, got {update!r}")
    keys = keys or HyperparameterKeys()
    meta: dict[str, Any] = {
        "source": "flower",
        "round": int(server_round),
        "client_id": str(client_id),
        "num_examples": int(num_examples),
        "update_kind": "weight_delta" if update == "weights" else "gradient",
    }
    if normalization is not None:
        if normalization != "none":
            raise ValueError(f"normalization must be 'none' or None (give mean/std in the attack config), got {normalization!r}")
        meta["normalization"] = "none"
    for key, value in config.items():
        if _scalar(value):
            meta[f"config.{key}"] = value
    if update == "gradient":
        meta["threat_model"] = "fedsgd"
        return meta
    lr = keys.first(config, keys.lr)
    if lr is None:
        raise ValueError(
            f"the server config {sorted(config)} has no learning rate under {list(keys.lr)}: the attack must know "
            "the client's lr to rebuild a weight update (pass HyperparameterKeys(lr=(...,)) with your app's key)"
        )
    batch = keys.first(config, keys.batch_size)
    batch = int(batch) if batch is not None and int(batch) > 0 else 0
    full_batch = batch == 0 or batch >= num_examples
    steps = keys.first(config, keys.local_steps)
    epochs = keys.first(config, keys.local_epochs)
    if steps is None:
        e = int(epochs) if epochs is not None else 1
        steps = e * (1 if full_batch else math.ceil(num_examples / batch))
    if epochs is not None:
        meta["local_epochs"] = int(epochs)
    meta.update(
        threat_model="fedavg",
        local_lr=float(lr),
        local_steps=int(steps),
        local_batch_size=0 if full_batch else batch,
        aggregation="mean",
    )
    return meta


def split_state(
    state: Mapping[str, Tensor], param_names: Optional[Sequence[str]] = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a state dict into (parameters, buffers), both in state-dict order (= ``named_parameters`` order).

    ``param_names`` (from the model) decides; without it, entries ending in a BN buffer name
    (``running_mean``, ``running_var``, ``num_batches_tracked``) are buffers and the rest parameters."""
    if param_names is not None:
        missing = [n for n in param_names if n not in state]
        if missing:
            raise ValueError(f"the arrays sent/returned lack the model's parameter(s) {missing[:4]}")
        wanted = set(param_names)
        params = {k: state[k] for k in param_names}
        buffers = {k: v for k, v in state.items() if k not in wanted}
        return params, buffers
    params = {k: v for k, v in state.items() if not k.rsplit(".", 1)[-1] in BUFFER_SUFFIXES}
    buffers = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in BUFFER_SUFFIXES}
    return params, buffers


def build_update_observation(
    global_state: Mapping[str, Tensor],
    client_state: Mapping[str, Tensor],
    metadata: Mapping[str, Any],
    num_examples: int,
    param_names: Optional[Sequence[str]] = None,
    update: UpdateKind = "weights",
) -> tuple[GradientObservation, dict[str, Tensor]]:
    """The observation of one client (``gradients`` = ``client - global`` per parameter for a weight update, the
    returned tensors themselves for a gradient; ``buffers`` = the client's returned buffers, format version 2)
    and those buffers."""
    if sorted(global_state) != sorted(client_state):
        extra = sorted(set(client_state) ^ set(global_state))
        raise ValueError(f"the client returned other arrays than the server sent (differing keys: {extra[:4]})")
    g_params, _ = split_state(global_state, param_names)
    c_params, c_buffers = split_state(client_state, param_names)
    tensors = []
    for name, start in g_params.items():
        new = c_params[name]
        if tuple(new.shape) != tuple(start.shape):
            raise ValueError(f"client array '{name}' has shape {tuple(new.shape)}, the server sent {tuple(start.shape)}")
        new = new.detach().cpu().float()
        tensors.append(new - start.detach().cpu().float() if update == "weights" else new)
    buffers = {k: v.detach().cpu().clone() for k, v in c_buffers.items()}
    obs = GradientObservation(
        gradients=tensors,
        batch_size=int(num_examples),
        param_names=list(g_params),
        metadata=dict(metadata),
        buffers=buffers or None,
    )
    return obs, buffers


def load_update_buffers(path: str | os.PathLike, observation: Optional[GradientObservation] = None) -> dict[str, Tensor]:
    """The client's buffers after its update ({} when none): the observation's ``buffers`` (format version 2),
    else a ``<path>.buffers.pt`` file next to it (what ``ThreatModelVictim(share_buffers=True)`` writes)."""
    obs = observation if observation is not None else GradientObservation.load(path)
    if obs.buffers:
        return dict(obs.buffers)
    side = os.fspath(path) + BUFFERS_SUFFIX
    if not os.path.exists(side):
        return {}
    raw = read_torch_file(side, "buffers file")
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in raw.items()):
        raise ObservationError(f"buffers file {side} must hold a dict of name -> tensor")
    return dict(raw)


class UpdateRecorder:
    """Writes captured updates under ``directory``: ``round_RRR_global.pt`` (the global state dict of the round,
    loadable as ``weights_path``), ``round_RRR_client_<id>.pt`` (the observation), and one JSON line per file
    in ``captures.jsonl`` (round, client, observation and weights paths)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._globals: dict[int, list[tuple[dict[str, Tensor], str]]] = {}
        self.written: list[dict[str, Any]] = []

    def global_path(self, server_round: int, state: Mapping[str, Tensor]) -> str:
        """Path of the global weights ``state`` of this round (written once per distinct state)."""
        seen = self._globals.setdefault(int(server_round), [])
        for known, path in seen:
            if known.keys() == state.keys() and all(torch.equal(known[k], state[k]) for k in state):
                return path
        suffix = "" if not seen else f"_{len(seen)}"
        path = os.path.join(self.directory, f"round_{int(server_round):03d}_global{suffix}.pt")
        copy = {k: v.detach().cpu().clone() for k, v in state.items()}
        save_atomic(copy, path)
        seen.append((copy, path))
        return path

    def record(
        self,
        server_round: int,
        client_id: str,
        global_state: Mapping[str, Tensor],
        client_state: Mapping[str, Tensor],
        config: Mapping[str, Any],
        num_examples: int,
        param_names: Optional[Sequence[str]] = None,
        update: UpdateKind = "weights",
        keys: Optional[HyperparameterKeys] = None,
        label: Optional[str] = None,
        normalization: Optional[str] = None,
    ) -> Optional[str]:
        """Write one client's update as ``round_RRR_client_<label>.pt`` (``label`` defaults to the client id);
        returns the observation path (None when it cannot be attacked: logged)."""
        if not 1 <= int(num_examples) <= MAX_BATCH_SIZE:
            print(f"lightning_gi capture: round {server_round} client {client_id} reported {num_examples} examples; "
                  f"only 1..{MAX_BATCH_SIZE} can be attacked, not written")
            return None
        weights = self.global_path(server_round, global_state)
        meta = update_metadata(config, num_examples, server_round, client_id, update, keys, normalization)
        obs, _ = build_update_observation(global_state, client_state, meta, num_examples, param_names, update)
        path = os.path.join(self.directory, f"round_{int(server_round):03d}_client_{label or client_id}.pt")
        obs.save(path)
        entry = {"round": int(server_round), "client_id": str(client_id), "observation": path, "weights": weights,
                 "label": str(label or client_id),
                 "num_examples": int(num_examples)}
        self.written.append(entry)
        with open(os.path.join(self.directory, "captures.jsonl"), "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return path


# --------------------------------------------------------------------------------------------------
# BatchNorm statistics leaked by the shared running statistics
# --------------------------------------------------------------------------------------------------
def _bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_input_counts(model: nn.Module, image_shape: Sequence[int], batch_size: int) -> list[int]:
    """Values per channel behind each BN layer's batch statistics (``batch_size * H * W`` of its input)."""
    counts: dict[int, int] = {}
    handles = []
    for i, (_, layer) in enumerate(_bn_layers(model)):
        handles.append(layer.register_forward_hook(
            lambda m, inp, out, i=i: counts.__setitem__(i, inp[0].numel() // inp[0].shape[1])))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *[int(s) for s in image_shape]))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return [counts[i] * int(batch_size) for i in range(len(counts))]


def recover_bn_statistics(
    model: nn.Module,
    before: Mapping[str, Tensor],
    after: Mapping[str, Tensor],
    counts: Sequence[int],
    local_steps: int = 1,
) -> list[tuple[Tensor, Tensor]]:
    """The client's batch mean and (biased) variance of each BN layer's input, from its running statistics.

    In train mode BatchNorm updates ``r <- (1 - m) r + m b`` with the batch mean ``b`` and the *unbiased*
    batch variance (``n / (n - 1)`` times the biased one, ``n = N*H*W``). One local step on the full batch
    therefore gives ``b = (r_after - (1 - m) r_before) / m`` exactly. With ``E`` local steps the result is
    ``(r_after - (1 - m)^E r_before) / (1 - (1 - m)^E)``: a weighted mean of the steps' statistics (an
    approximation: the weights change between steps). ``momentum=None`` (cumulative average) uses
    ``m = 1 / (num_batches_tracked + 1)`` for one step. Returns ``[(mean, biased_var)]`` per BN layer in
    ``model.modules()`` order, the order :class:`~lightning_gi.objectives.priors.BNStatisticsPrior` uses.
    """
    layers = _bn_layers(model)
    if len(counts) != len(layers):
        raise ValueError(f"got {len(counts)} counts for {len(layers)} BN layers")
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    out = []
    for (name, layer), n in zip(layers, counts):
        prefix = f"{name}." if name else ""
        try:
            rm0, rv0 = before[prefix + "running_mean"].double(), before[prefix + "running_var"].double()
            rm1, rv1 = after[prefix + "running_mean"].double(), after[prefix + "running_var"].double()
        except KeyError as err:
            raise ValueError(f"BN layer '{name}': running statistics {err} missing from the buffers") from None
        if layer.momentum is None:
            if local_steps != 1:
                raise ValueError(f"BN layer '{name}' has momentum=None: only one local step can be inverted")
            tracked = int(before.get(prefix + "num_batches_tracked", torch.tensor(0)))
            decay = 1.0 - 1.0 / (tracked + 1)
        else:
            decay = (1.0 - float(layer.momentum)) ** int(local_steps)
        mean = (rm1 - decay * rm0) / (1.0 - decay)
        unbiased = (rv1 - decay * rv0) / (1.0 - decay)
        biased = unbiased * (n - 1) / n if n > 1 else unbiased
        out.append((mean.float(), biased.float()))
    return out


def set_bn_targets(model: nn.Module, statistics: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Write recovered ``(mean, biased_var)`` into the BN layers' running buffers, where
    :class:`~lightning_gi.objectives.priors.BNStatisticsPrior` reads its targets. Use it on a victim run in
    train mode (its forward then normalises with batch statistics, so the buffers only serve the prior)."""
    layers = _bn_layers(model)
    if len(statistics) != len(layers):
        raise ValueError(f"got statistics for {len(statistics)} BN layers, the model has {len(layers)}")
    with torch.no_grad():
        for (_, layer), (mean, var) in zip(layers, statistics):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)


class CapturedUpdateVictim(ObservationFileVictim):
    """:class:`~lightning_gi.victim.ObservationFileVictim` for a captured FedAvg update, with the BN leak.

    ``bn_targets=True``: the client's BN batch statistics, recovered from the running statistics it returned
    (:func:`recover_bn_statistics`; before = the victim's buffers loaded from ``weights_path``, after = the
    buffers stored with the observation), are written into the victim's BN buffers (:func:`set_bn_targets`),
    i.e. they become the targets of a ``BNStatisticsPrior`` in the attack. Needs ``train_mode=True`` (the
    client trained in train mode, and the buffers then do not enter the victim's forward).
    Other arguments as :class:`~lightning_gi.victim.ObservationFileVictim`.
    """

    def __init__(
        self,
        model: nn.Module,
        observation_path: str,
        ground_truth_path: Optional[str] = None,
        weights_path: Optional[str] = None,
        model_seed: Optional[int] = None,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        num_classes: Optional[int] = None,
        train_mode: bool = False,
        bn_targets: bool = False,
        normalization: Optional[Normalization] = None,
    ) -> None:
        if bn_targets and not train_mode:
            raise ValueError("bn_targets=True needs train_mode=True: the client's BN used batch statistics")
        super().__init__(model, observation_path, ground_truth_path, weights_path=weights_path, model_seed=model_seed,
                         image_shape=image_shape, mean=mean, std=std, num_classes=num_classes, train_mode=train_mode,
                         normalization=normalization)
        self.bn_targets = bn_targets
        self.recovered_bn_statistics: Optional[list[tuple[Tensor, Tensor]]] = None

    def build_observation(self):  # type: ignore[override]
        obs, gt = super().build_observation()
        if self.bn_targets:
            after = load_update_buffers(self.observation_path, obs)
            if not after:
                raise ObservationError(f"{self.observation_path}: bn_targets=True but the capture holds no BN buffers")
            before = {n: b.detach().clone() for n, b in self.model.named_buffers()}
            lbs = int(obs.metadata.get("local_batch_size", 0) or 0)
            counts = bn_input_counts(self.model, self.image_shape, lbs if 0 < lbs < obs.batch_size else obs.batch_size)
            steps = int(obs.metadata.get("local_steps", 1))
            self.recovered_bn_statistics = recover_bn_statistics(self.model, before, after, counts, local_steps=steps)
            set_bn_targets(self.model, self.recovered_bn_statistics)
        return obs, gt


__all__ = [
    "BUFFERS_SUFFIX",
    "CapturedUpdateVictim",
    "HyperparameterKeys",
    "UPDATE_KINDS",
    "UpdateRecorder",
    "bn_input_counts",
    "build_update_observation",
    "load_update_buffers",
    "recover_bn_statistics",
    "set_bn_targets",
    "split_state",
    "update_metadata",
]
