"""Threat models on the victim side: the former ``ThreatModelVictim`` name, and the client names.

The client computation (FedSGD gradient, FedAvg local steps, defenses with one seeding rule, aggregation over
clients) is :mod:`lightning_gi.client`, the ONE simulation shared by the victim and by every attack; the ONE
victim DataModule is :class:`lightning_gi.victim.Victim`, whose ``client``, ``num_clients``, ``aggregation``,
``defenses`` and ``share_*`` arguments state the threat model. :class:`ThreatModelVictim` is kept as a
compatibility name for ``Victim(source=DatasetImages(...), ...)``, and the names of :mod:`lightning_gi.client`
stay importable from here.

The observation records all hyperparameters an attacker needs in ``metadata`` (str/int/float/bool), which
every attack reads back (:meth:`lightning_gi.client.ThreatModel.from_metadata`). It records nothing that
rebuilds the private batch: no dataset indices, no ``batch_seed``, no defense noise seed. See
docs/threat_models.md.
"""
from __future__ import annotations

from ..client import (
    AGGREGATIONS,
    THREAT_MODELS,
    Aggregation,
    ClientUpdate,
    FedAvgClient,
    FedSGDClient,
    ThreatModel,
    UpdateSpec,
    client_gradient,
    local_step_indices,
    simulate_clients,
    simulate_shared_update,
    unrolled_update,
)
from .datamodule import FedSGDVictim, Victim, public_repr


class ThreatModelVictim(FedSGDVictim):
    """Former name of ``Victim(source=DatasetImages(...), client=..., num_clients=..., ...)``: the same arguments
    as :class:`~lightning_gi.victim.FedSGDVictim` (``batch_size`` is per client);
    ``ThreatModelVictim.from_tensors(model, images, labels, ...)`` is :meth:`Victim.from_tensors`."""


__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "ThreatModel",
    "client_gradient",
    "ClientUpdate",
    "FedAvgClient",
    "FedSGDClient",
    "THREAT_MODELS",
    "ThreatModelVictim",
    "UpdateSpec",
    "Victim",
    "local_step_indices",
    "public_repr",
    "simulate_clients",
    "simulate_shared_update",
    "unrolled_update",
]
