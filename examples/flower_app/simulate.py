#!/usr/bin/env python
"""Run the example HiSo Flower app in Flower's simulation runtime, in one process (no SuperLink left running), and
print the bytes of every round as the ledger counts them beside the bytes Flower serialised for its messages.

    python examples/flower_app/simulate.py                                   # 3 clients, 2 per round, 30 rounds
    python examples/flower_app/simulate.py num-server-rounds=100 local-steps=2

Settings are those of `[tool.flwr.app.config]` in pyproject.toml, overridden by `key=value` arguments. `flwr run`
is what a real deployment uses (docs/scaling.md); this script calls `flwr.simulation.run_simulation` instead so that
it can also print the strategy's counters.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_config(overrides: list[str]) -> dict:
    config = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config.update({"num-server-rounds": 30, "output-dir": "outputs/flower_hiso_sim"})
    for item in overrides:
        key, value = item.split("=", 1)
        try:
            config[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            config[key] = value  # a bare string
    return config


def main() -> None:
    from flwr.simulation import run_simulation
    from hiso_flower_app.server_app import build_strategy, finish
    from hiso_flower_app.task import collator, make_args, make_model, node_dataset

    from hf_hiso.flower import HiSoClient, make_client_app, make_server_app

    config = load_config(sys.argv[1:])
    args = make_args(config)
    client = HiSoClient(
        lambda: make_model(args.seed), args, lambda ctx: node_dataset(ctx, config), data_collator=collator()
    )
    done: dict = {}

    def on_finish(strategy, result, context):
        finish(strategy, result, context, config)
        done["strategy"] = strategy

    server_app = make_server_app(
        lambda context: build_strategy(context, config), timeout=float(config["round-timeout"]), on_finish=on_finish
    )
    started = time.time()
    run_simulation(
        server_app=server_app,
        client_app=make_client_app(client),
        num_supernodes=int(config["num-clients"]),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": min(2, os.cpu_count() or 1), "include_dashboard": False},
        },
    )
    strategy = done["strategy"]
    header = ["round", "sent", "repl", "ledger down", "flower down", "ledger up", "flower up"]
    print("\n" + " ".join(f"{h:>11}" for h in header))
    for m in strategy.round_metrics:
        row = [m["round"], m["reported"] + m["dropped"], m["reported"], m["ledger_bytes_downlink"]]
        row += [m["flower_bytes_downlink"], m["ledger_bytes_uplink"], m["flower_bytes_uplink"]]
        print(" ".join(f"{v:>11}" for v in row))
    summary = strategy.communication_summary()
    with open(os.path.join(str(config["output-dir"]), "federation_summary.json")) as f:
        accuracy = json.load(f)["validation_accuracy"]
    keys = [
        "rounds",
        "clients_sampled",
        "bytes_uplink",
        "bytes_downlink",
        "bytes_total",
        "flower_bytes_uplink",
        "flower_bytes_downlink",
        "flower_bytes_total",
        "flower_bytes_discovery",
        "paper_bytes",
        "fedavg_bytes",
        "replica_mismatches",
        "failed_replies",
    ]
    print(json.dumps({k: summary[k] for k in keys}, indent=1))
    per_client = summary["clients_sampled"] or 1
    print(
        f"per sampled client and round: ledger {summary['bytes_total'] / per_client:.1f} B, "
        f"Flower {summary['flower_bytes_total'] / per_client:.1f} B, paper convention "
        f"{summary['paper_bytes'] / per_client:.1f} B, FedAvg {summary['fedavg_bytes'] / per_client:.1f} B"
    )
    print(f"validation accuracy of the server's replica: {accuracy:.4f}; wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
