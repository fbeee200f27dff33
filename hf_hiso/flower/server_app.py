"""The HiSo `ServerApp`: runs a [`HiSoStrategy`] with Flower's own round loop (`Strategy.start`)."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.result import Result

from .strategy import HiSoStrategy


def make_server_app(
    strategy_fn: Callable[[Context], HiSoStrategy],
    *,
    timeout: float | Callable[[Context], float] = 3600.0,
    on_finish: Callable[[HiSoStrategy, Result, Context], None] | None = None,
) -> ServerApp:
    """A Flower `ServerApp` that builds its strategy with `strategy_fn(context)` (read settings from
    `context.run_config`, i.e. `[tool.flwr.app.config]` or `flwr run --run-config`), runs `strategy.num_rounds`
    rounds, waiting at most `timeout` seconds per round for the clients' replies, then calls
    `on_finish(strategy, result, context)` (save `strategy.replica.model`, write `strategy.communication_summary()`).
    """
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = strategy_fn(context)
        seconds = timeout(context) if callable(timeout) else timeout
        result = strategy.run(grid, timeout=seconds)
        if on_finish is not None:
            on_finish(strategy, result, context)

    return app
