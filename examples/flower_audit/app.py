"""A small Flower app (Message API) audited by lightning_gi: a ServerApp running FedAvg and a ClientApp
training a small CNN on a few bundled photographs per client. The only audit-specific line is the
``CaptureStrategy(...)`` wrapper in :func:`run_federation`.

Each client holds ``images_per_client`` 16x16 photographs of the PRIVATE pool of
``lightning_gi.victim.data`` (client k holds slice k of one seeded draw with distinct labels) and runs
``local-steps`` plain SGD steps (``lr``; ``batch-size`` examples per step, cycling through its data in
order; 0 or >= its data: full batch) as the server's config says. The client also writes its own data to
``<out>/private/`` so the audit can score the reconstruction: that directory is the client's, never the
server's, and nothing of it is in the captured files.

Defenses Flower ships, applied when asked: client-side fixed clipping (``fixedclipping_mod`` on the
client + ``DifferentialPrivacyClientSideFixedClipping`` on the server) and local DP (``LocalDpMod``:
clipping + Gaussian noise on the client). See run.py and docs/flower.md.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from torch import nn

from lightning_gi.integrations.audit_models import AuditCNN
from lightning_gi.integrations.flower import CaptureStrategy
from lightning_gi.observation import save_atomic
from lightning_gi.victim.data import build_dataset, select_batch

IMAGE_SIZE = 16
NUM_CLASSES = 14  # one class per bundled private photograph


def build_model(batch_norm: bool = False, seed: int = 0) -> nn.Module:
    """The federation's model (also what the attack config builds: AuditCNN with these arguments)."""
    torch.manual_seed(seed)
    return AuditCNN(num_classes=NUM_CLASSES, in_channels=3, image_size=IMAGE_SIZE, batch_norm=batch_norm)


def client_data(partition_id: int, images_per_client: int, num_partitions: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s private images ([n, 3, 16, 16] in [0, 1]) and labels, from the PRIVATE pool."""
    dataset = build_dataset("photographs", image_size=IMAGE_SIZE, channels=3, pool="private")
    images, labels, _ = select_batch(dataset, images_per_client * num_partitions, seed=seed, label_mode="unique")
    sl = slice(partition_id * images_per_client, (partition_id + 1) * images_per_client)
    return images[sl].clone(), labels[sl].clone()


def local_training(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, lr: float, steps: int, batch_size: int) -> float:
    """Plain PyTorch local SGD: ``steps`` steps, step s on examples ``(s*b + j) mod n`` (full batch if b is 0 or >= n)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = images.shape[0]
    loss = torch.zeros(())
    model.train()
    for step in range(steps):
        idx = torch.arange(n) if batch_size <= 0 or batch_size >= n else (torch.arange(batch_size) + step * batch_size) % n
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
    return float(loss.detach())


def make_client_app(
    out_dir: str, images_per_client: int = 2, data_seed: int = 0, fixed_clipping: bool = False,
    local_dp: Optional[Mapping[str, float]] = None,
) -> ClientApp:
    """The ClientApp. ``fixed_clipping``: Flower's ``fixedclipping_mod`` (the server must send the clipping norm:
    ``run_federation(clip_norm=...)``). ``local_dp``: ``LocalDpMod(**local_dp)`` (keys clipping_norm,
    sensitivity, epsilon, delta)."""
    mods: list[Any] = []
    if fixed_clipping:
        from flwr.clientapp.mod import fixedclipping_mod

        mods.append(fixedclipping_mod)
    if local_dp:
        from flwr.clientapp.mod import LocalDpMod

        mods.append(LocalDpMod(**{k: float(v) for k, v in local_dp.items()}))
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        config = msg.content["config"]
        partition = int(context.node_config.get("partition-id", 0))
        partitions = int(context.node_config.get("num-partitions", 1))
        images, labels = client_data(partition, images_per_client, partitions, data_seed)
        model = build_model(bool(config.get("batch-norm", False)))
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss = local_training(
            model, images, labels, float(config["lr"]), int(config.get("local-steps", 1)), int(config.get("batch-size", 0))
        )
        # the client's own copy of its data, for scoring the audit (never sent to the server)
        save_atomic({"images": images, "labels": labels},
                    os.path.join(out_dir, "private", f"node_{context.node_id}.pt"))
        content = RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": int(images.shape[0]), "train-loss": loss}),
        })
        return Message(content=content, reply_to=msg)

    return app


class RoundConfigFedAvg(FedAvg):
    """FedAvg whose train config may change per round (``round_configs[r]`` is merged into round r's config)."""

    def __init__(self, round_configs: Optional[Mapping[int, Mapping[str, Any]]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_configs = {int(k): dict(v) for k, v in (round_configs or {}).items()}

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
        config = ConfigRecord({**dict(config), **self.round_configs.get(int(server_round), {})})
        return super().configure_train(server_round, arrays, config, grid)


def run_federation(
    grid: Grid,
    out_dir: str,
    num_clients: int = 2,
    num_rounds: int = 1,
    train_config: Optional[Mapping[str, Any]] = None,
    round_configs: Optional[Mapping[int, Mapping[str, Any]]] = None,
    batch_norm: bool = False,
    clip_norm: Optional[float] = None,
    noise_multiplier: float = 0.0,
) -> CaptureStrategy:
    """One federation: FedAvg (optionally under Flower's client-side fixed clipping DP wrapper), captured."""
    config = {"lr": 0.1, "local-steps": 1, "batch-size": 0, **dict(train_config or {}), "batch-norm": bool(batch_norm)}
    strategy: Any = RoundConfigFedAvg(
        round_configs, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_clients,
        min_available_nodes=num_clients,
    )
    if clip_norm is not None:
        strategy = DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier, clip_norm, num_clients)
    strategy = CaptureStrategy(strategy, out_dir, normalization="none")  # <- the one line that audits this app
    model = build_model(batch_norm)
    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=num_rounds,
        train_config=ConfigRecord(config),
    )
    return strategy


def make_server_app(out_dir: str, **federation: Any) -> ServerApp:
    """The ServerApp running :func:`run_federation` with these arguments."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, out_dir, **federation)

    return app


def link_ground_truth(out_dir: str) -> list[str]:
    """For the audit's metrics: copy each client's own data file (``private/node_<id>.pt``) to
    ``private/round_RRR_client_KK.pt`` next to the name of its captured update. Returns the files written."""
    import json
    import shutil

    written = []
    manifest = os.path.join(out_dir, "captures.jsonl")
    if not os.path.exists(manifest):
        return written
    with open(manifest) as fh:
        for line in fh:
            entry = json.loads(line)
            source = os.path.join(out_dir, "private", f"node_{entry['client_id']}.pt")
            if os.path.exists(source):
                target = os.path.join(out_dir, "private", os.path.basename(entry["observation"]))
                shutil.copyfile(source, target)
                written.append(target)
    return written
