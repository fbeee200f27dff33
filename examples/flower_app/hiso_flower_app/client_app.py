"""The ClientApp: `flower-supernode` runs it on every client machine."""

from __future__ import annotations

from flwr.app import Context

from hf_hiso.flower import HiSoClient, make_client_app

from .task import collator, make_args, make_model, node_dataset


def build_client(context: Context) -> HiSoClient:
    args = make_args(context.run_config)
    return HiSoClient(lambda: make_model(args.seed), args, node_dataset, data_collator=collator())


app = make_client_app(build_client)
