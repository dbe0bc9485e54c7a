"""Run the audited Flower app in Flower's simulation engine (Ray), then attack a captured update.

    python examples/flower_audit/run.py                      # 2 clients, 1 round, 1 local step (FedSGD-like)
    python examples/flower_audit/run.py --local-steps 3 --batch-size 1      # multi-step FedAvg
    python examples/flower_audit/run.py --fixed-clipping 0.5 --noise-multiplier 0.0   # Flower's clipping
    python examples/flower_audit/run.py --local-dp 1.0 1.0 100 1e-5         # LocalDpMod(clip, sens, eps, delta)
    lightning-gi fit --config configs/flower_fedavg_audit.yaml              # attack round 1, client 00

Files (under --out, default examples/flower_audit/captures): round_RRR_global.pt, round_RRR_client_KK.pt (the
captured observations), captures.jsonl (index), private/ (the clients' own data, for metrics only).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app import link_ground_truth, make_client_app, make_server_app  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("examples", "flower_audit", "captures"))
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--images-per-client", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=0, help="examples per local step (0: all)")
    p.add_argument("--batch-norm", action="store_true", help="model with BatchNorm (its running stats are shared)")
    p.add_argument("--fixed-clipping", type=float, default=None, metavar="NORM",
                   help="Flower's client-side fixed clipping (fixedclipping_mod) at this norm")
    p.add_argument("--noise-multiplier", type=float, default=0.0, help="server-side noise of the clipping wrapper")
    p.add_argument("--local-dp", type=float, nargs=4, default=None, metavar=("CLIP", "SENSITIVITY", "EPSILON", "DELTA"),
                   help="Flower's LocalDpMod on every client")
    args = p.parse_args(argv)
    from flwr.simulation import run_simulation

    if os.path.isdir(args.out) and os.listdir(args.out):
        if not os.path.exists(os.path.join(args.out, "captures.jsonl")):
            p.error(f"--out {args.out} exists and is not a previous capture directory; choose another")
        shutil.rmtree(args.out)  # a previous capture: replaced
    os.makedirs(args.out, exist_ok=True)
    local_dp = None
    if args.local_dp:
        local_dp = dict(zip(("clipping_norm", "sensitivity", "epsilon", "delta"), args.local_dp))
    server = make_server_app(
        args.out, num_clients=args.clients, num_rounds=args.rounds, batch_norm=args.batch_norm,
        train_config={"lr": args.lr, "local-steps": args.local_steps, "batch-size": args.batch_size},
        clip_norm=args.fixed_clipping, noise_multiplier=args.noise_multiplier,
    )
    client = make_client_app(args.out, args.images_per_client, fixed_clipping=args.fixed_clipping is not None,
                             local_dp=local_dp)
    run_simulation(server, client, num_supernodes=args.clients, backend_config={"client_resources": {"num_cpus": 1}})
    link_ground_truth(args.out)
    print(f"captured updates in {args.out}:")
    for name in sorted(os.listdir(args.out)):
        print("  ", name)


if __name__ == "__main__":
    main()
