"""Capture the client updates of a running Flower (``flwr``) federation as lightning_gi observation files.

Wrap your server strategy in one line and run your app as usual::

    from lightning_gi.integrations.flower import CaptureStrategy
    strategy = CaptureStrategy(FedAvg(...), "captures/my_run")      # Message API (flwr >= 1.20)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), train_config=ConfigRecord({"lr": 0.1}))

Every round, for every client that returned a training reply, it writes (:class:`UpdateRecorder`)
``round_RRR_global.pt`` (the global state dict the clients started from: use it as ``weights_path``) and
``round_RRR_client_KK.pt`` (``KK``: the client's rank by node id in that round), an observation whose
``gradients`` are the client's weight delta ``w_E - w_0`` (``update="gradient"`` for FedSGD apps whose
clients return gradients), with the parameter names, the client's returned buffers (BN running statistics,
the observation's ``buffers``, format version 2) and as metadata every scalar of the config the server sent to that client, the ``local_lr``,
``local_steps``, ``local_batch_size`` derived from it (:class:`HyperparameterKeys`), the reported number of
examples, the round and the Flower node id. The wrapper sits outermost, so it sees exactly what the
server receives: after client-side mods (clipping, local DP), before server-side noise.

The legacy ``flwr.server.strategy.Strategy`` API (``configure_fit``/``aggregate_fit``) is captured by
:class:`LegacyCaptureStrategy`, which needs the model (its ndarrays are unnamed).

Attack a captured file with ``lightning-gi fit --config configs/flower_fedavg_audit.yaml`` (docs/flower.md).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lightning_gi.integrations.flower needs Flower: pip install 'lightning_gi[flower]' (flwr[simulation])"
    ) from err

from .capture import (
    BUFFERS_SUFFIX,
    HyperparameterKeys,
    UpdateKind,
    UPDATE_KINDS,
    UpdateRecorder,
    bn_input_counts,
    load_update_buffers,
    recover_bn_statistics,
    set_bn_targets,
)
from .audit_models import AuditCNN

NUM_EXAMPLES_KEY = "num-examples"


def _config_dict(records: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for record in records.values():
        out.update(dict(record))
    return out


def _num_examples(content: Any, key: str) -> Optional[int]:
    for record in content.metric_records.values():
        if key in record:
            return int(record[key])
    return None


def _param_names(model: Optional[nn.Module]) -> Optional[list[str]]:
    return None if model is None else [n for n, _ in model.named_parameters()]


class CaptureStrategy(Strategy):
    """Wrap a Message-API Flower strategy; writes every training reply as an observation (module docs).

    Args:
        strategy: the strategy to wrap (``FedAvg``, a DP wrapper around it, ...); all calls are delegated.
        directory: where the files go (created).
        model: optional template of the global model; its ``named_parameters`` decide which arrays are
            parameters (default: every array except BN buffers ``running_mean/running_var/num_batches_tracked``).
        update: ``"weights"`` (clients return trained weights: the delta is captured) or ``"gradient"``.
        keys: config names of lr / local steps / local epochs / batch size (:class:`HyperparameterKeys`).
        num_examples_key: the MetricRecord key of the client's example count (Flower's ``"num-examples"``).
        rounds: capture only these rounds (default: all).
        normalization: ``"none"``: record in each file that the clients feed [0, 1] images unchanged (else give
            ``mean``/``std`` in the attack config).
    """

    def __init__(
        self,
        strategy: Strategy,
        directory: str | os.PathLike,
        model: Optional[nn.Module] = None,
        update: UpdateKind = "weights",
        keys: Optional[HyperparameterKeys] = None,
        num_examples_key: str = NUM_EXAMPLES_KEY,
        rounds: Optional[Sequence[int]] = None,
        normalization: Optional[Literal["none"]] = None,
    ) -> None:
        if update not in UPDATE_KINDS:
            raise ValueError(f"update must be one of {UPDATE_KINDS}, got {update!r}")
        self.strategy = strategy
        self.recorder = UpdateRecorder(directory)
        self.param_names = _param_names(model)
        self.update = update
        self.keys = keys or HyperparameterKeys()
        self.num_examples_key = num_examples_key
        self.rounds = None if rounds is None else {int(r) for r in rounds}
        self.normalization = normalization
        self._sent: dict[int, dict[int, tuple[dict[str, Tensor], dict[str, Any]]]] = {}

    @property
    def written(self) -> list[dict[str, Any]]:
        """One entry per written observation (round, client_id, label, observation, weights, num_examples)."""
        return self.recorder.written

    def _captures(self, server_round: int) -> bool:
        return self.rounds is None or int(server_round) in self.rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self._captures(server_round):
            sent: dict[int, tuple[dict[str, Tensor], dict[str, Any]]] = {}
            states: dict[int, dict[str, Tensor]] = {}
            for msg in messages:
                records = list(msg.content.array_records.values())
                if len(records) != 1:
                    continue  # not a single-model message: nothing this wrapper can interpret
                state = states.setdefault(id(records[0]), records[0].to_torch_state_dict())
                sent[int(msg.metadata.dst_node_id)] = (state, _config_dict(msg.content.config_records))
            self._sent[int(server_round)] = sent
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        sent = self._sent.pop(int(server_round), None)
        if sent is not None:
            valid = sorted(
                (r for r in replies if not r.has_error() and int(r.metadata.src_node_id) in sent),
                key=lambda r: int(r.metadata.src_node_id),
            )
            width = max(2, len(str(len(valid) - 1)))
            for rank, reply in enumerate(valid):
                node = int(reply.metadata.src_node_id)
                records = list(reply.content.array_records.values())
                count = _num_examples(reply.content, self.num_examples_key)
                if len(records) != 1 or count is None:
                    print(f"lightning_gi capture: round {server_round} node {node}: reply without one ArrayRecord "
                          f"and '{self.num_examples_key}', not captured")
                    continue
                global_state, config = sent[node]
                self.recorder.record(
                    server_round, str(node), global_state, records[0].to_torch_state_dict(), config, count,
                    self.param_names, self.update, self.keys, label=f"{rank:0{width}d}", normalization=self.normalization,
                )
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def __getattr__(self, name: str) -> Any:  # attributes of the wrapped strategy (e.g. privacy_spent)
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)


def _legacy_strategy_base() -> type:
    from flwr.server.strategy import Strategy as LegacyStrategy

    return LegacyStrategy


class LegacyCaptureStrategy(_legacy_strategy_base()):  # type: ignore[misc]
    """Capture for the legacy ``flwr.server.strategy.Strategy`` API (``configure_fit`` / ``aggregate_fit``).

    Args:
        strategy: the legacy strategy to wrap. model: the global model's template: legacy ndarrays are
        unnamed, so they are named by ``model.state_dict()`` order. Other arguments as :class:`CaptureStrategy`.
    """

    def __init__(
        self,
        strategy: Any,
        directory: str | os.PathLike,
        model: nn.Module,
        update: UpdateKind = "weights",
        keys: Optional[HyperparameterKeys] = None,
        rounds: Optional[Sequence[int]] = None,
        normalization: Optional[Literal["none"]] = None,
    ) -> None:
        if update not in UPDATE_KINDS:
            raise ValueError(f"update must be one of {UPDATE_KINDS}, got {update!r}")
        self.strategy = strategy
        self.recorder = UpdateRecorder(directory)
        self.state_keys = list(model.state_dict().keys())
        self.param_names = _param_names(model)
        self.update = update
        self.keys = keys or HyperparameterKeys()
        self.rounds = None if rounds is None else {int(r) for r in rounds}
        self.normalization = normalization
        self._sent: dict[int, dict[str, tuple[dict[str, Tensor], dict[str, Any]]]] = {}

    @property
    def written(self) -> list[dict[str, Any]]:
        return self.recorder.written

    def _state(self, parameters: Any) -> dict[str, Tensor]:
        from flwr.common import parameters_to_ndarrays

        arrays = parameters_to_ndarrays(parameters)
        if len(arrays) != len(self.state_keys):
            raise ValueError(f"got {len(arrays)} arrays but the model's state dict has {len(self.state_keys)} entries")
        return {k: torch.as_tensor(a.copy()) for k, a in zip(self.state_keys, arrays)}

    def initialize_parameters(self, client_manager: Any) -> Any:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        pairs = self.strategy.configure_fit(server_round, parameters, client_manager)
        if self.rounds is None or int(server_round) in self.rounds:
            self._sent[int(server_round)] = {
                str(proxy.cid): (self._state(ins.parameters), dict(ins.config)) for proxy, ins in pairs
            }
        return pairs

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
        sent = self._sent.pop(int(server_round), None)
        if sent is not None:
            valid = sorted((r for r in results if str(r[0].cid) in sent), key=lambda r: str(r[0].cid))
            width = max(2, len(str(len(valid) - 1)))
            for rank, (proxy, res) in enumerate(valid):
                global_state, config = sent[str(proxy.cid)]
                self.recorder.record(
                    server_round, str(proxy.cid), global_state, self._state(res.parameters), config,
                    int(res.num_examples), self.param_names, self.update, self.keys, label=f"{rank:0{width}d}", normalization=self.normalization,
                )
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> Any:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        return self.strategy.evaluate(server_round, parameters)

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)


def captured_bn_statistics(
    model: nn.Module,
    observation_path: str | os.PathLike,
    weights_path: str | os.PathLike,
    image_shape: Sequence[int],
) -> list[tuple[Tensor, Tensor]]:
    """The client's BN batch statistics ``[(mean, biased_var)]`` recovered from a captured update
    (:func:`~lightning_gi.integrations.capture.recover_bn_statistics`): the running statistics before come from
    the round's global weights, those after from the buffers the client returned with its update."""
    from ..observation import GradientObservation, read_torch_file

    obs = GradientObservation.load(observation_path)
    after = load_update_buffers(observation_path, obs)
    if not after:
        raise ValueError(f"{observation_path}: the client returned no buffers (no BN running statistics)")
    before = read_torch_file(weights_path, "weights file")
    steps = int(obs.metadata.get("local_steps", 1))
    counts = bn_input_counts(model, image_shape, obs.batch_size if int(obs.metadata.get("local_batch_size", 0) or 0) == 0
                             else int(obs.metadata["local_batch_size"]))
    return recover_bn_statistics(model, before, after, counts, local_steps=steps)


__all__ = [
    "AuditCNN",
    "BUFFERS_SUFFIX",
    "CaptureStrategy",
    "HyperparameterKeys",
    "LegacyCaptureStrategy",
    "NUM_EXAMPLES_KEY",
    "captured_bn_statistics",
    "set_bn_targets",
]
