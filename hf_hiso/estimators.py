r"""Estimator hooks of [`HiSoOptimizer`] and the registry that resolves `HiSoConfig(zo_estimator=...)`.

An estimator decides, for every step, two things that the optimizer otherwise fixes:

* **which directions** are perturbed: `direction_factors(state, seed, P, n)` returns a factor `f_{p,i}` per direction
  `p` and trainable tensor `i` (a deterministic function of the seed), so that `z_{p,i} = f_{p,i} u_{p,i} / sqrt(H_i)`;
  `None` keeps `f = 1` (and the optimizer's own code path);
* **how the measured scalars become update coefficients**: `coefficients(state, slopes, update_state)` maps a step's
  (averaged) slopes `g` to the `c` of `x <- x - (lr / P) sum_p c_p z_p`, given the estimator's state. The state lives
  in `optimizer.state["estimator"]` (checkpointed with the optimizer) and changes only when `update_state` is true,
  which the optimizer passes exactly where HiSo's `H` changes (the global update of a step or round, never a client's
  local step), so it is a function of the history of averaged scalars: replicas, catch-up and resume stay exact.

`scalars_per_direction` is what a step sends per direction (1 for every estimator here: the communication ledger is
unchanged). The base class [`ZOEstimator`] is HiSo / DeComFL unchanged (`zo_estimator="default"`). Other estimators
are experimental and live in `hf_hiso.experimental`, which registers them by name when it is imported (the registry
imports it on first use of an unknown name).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

__all__ = ["ESTIMATORS", "ZOEstimator", "register_estimator", "resolve_estimator"]

ESTIMATORS: dict[str, type[ZOEstimator]] = {}
# Imported on first use of a name the registry does not hold yet (it registers the experimental estimators).
EXPERIMENTAL_MODULE = "hf_hiso.experimental"


def register_estimator(name: str) -> Callable[[type[ZOEstimator]], type[ZOEstimator]]:
    """Class decorator: makes `cls` selectable as `HiSoConfig(zo_estimator=name)` / `HiSoOptimizer(estimator=name)`."""

    def wrap(cls: type[ZOEstimator]) -> type[ZOEstimator]:
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return wrap


@dataclasses.dataclass
class EstimatorConfig:
    """Settings of an estimator; subclasses add fields and check them in `check()`."""

    def check(self, bad: Callable[[str, str, object], ValueError]) -> None:
        """Raises `bad(field, allowed, value)` for the first invalid field."""


class ZOEstimator:
    r"""HiSo / DeComFL: every direction whole (`f = 1`), coefficients equal to the slopes (`c = g`), no state.

    Subclasses override the hooks; each takes its settings as keyword arguments, checked by its `config_class`.
    """

    name: ClassVar[str] = "default"
    config_class: ClassVar[type[EstimatorConfig]] = EstimatorConfig
    scalars_per_direction: ClassVar[int] = 1

    def __init__(self, field: str = "estimator_kwargs", **kwargs: Any):
        names = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"`{field}` has unknown setting(s) {unknown} for estimator {self.name!r}; allowed: {sorted(names)}"
            )
        self.config = self.config_class(**kwargs)

        def bad(name: str, allowed: str, value: object) -> ValueError:
            return ValueError(f"`{field}[{name!r}]` of estimator {self.name!r} must be {allowed}, got {value!r}")

        self.config.check(bad)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def bind(self, params: list[torch.Tensor], param_groups: list[dict]) -> None:
        """Called once by the optimizer with its trainable tensors (in direction order) and parameter groups."""

    def init_state(self) -> dict[str, Any]:
        """The estimator's state at step 0 (kept in `optimizer.state["estimator"]` beside its `name`)."""
        return {}

    def direction_factors(self, state: dict[str, Any], seed: int, num_directions: int) -> list[list[float]] | None:
        """`f_{p,i}` per direction and trainable tensor for step seed `seed`, or `None` for whole directions."""
        return None

    def coefficients(self, state: dict[str, Any], slopes: torch.Tensor, update_state: bool) -> torch.Tensor:
        """Update coefficients `c` (`(P,)`) from the step's averaged slopes `g`; updates `state` if `update_state`."""
        return slopes


register_estimator("default")(ZOEstimator)


def parse_estimator_kwargs(value: Mapping[str, Any] | str | None, field: str) -> dict[str, Any]:
    """A dict from a mapping, `None` or a JSON object string (the command-line spelling of `lr_scheduler_kwargs`)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"`{field}` must be a dict or a JSON object string, got {value!r} ({err})") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"`{field}` must be a dict or a JSON object string, got {value!r}")
    return dict(value)


def resolve_estimator(
    estimator: str | ZOEstimator | type[ZOEstimator] | None,
    kwargs: Mapping[str, Any] | str | None = None,
    prefix: str = "",
) -> ZOEstimator:
    """The estimator object for a registered name, a [`ZOEstimator`] subclass or instance (`None`: the default).

    Raises a `ValueError` naming `{prefix}estimator` (unknown name, wrong type) or `{prefix}estimator_kwargs`
    (unknown or invalid setting)."""
    field, kw_field = f"{prefix}estimator", f"{prefix}estimator_kwargs"
    kwargs = parse_estimator_kwargs(kwargs, kw_field)
    if isinstance(estimator, ZOEstimator):
        if kwargs:
            raise ValueError(f"`{kw_field}` must be empty when `{field}` is an estimator object (it has its settings)")
        return estimator
    if estimator is None:
        estimator = "default"
    if isinstance(estimator, str):
        if estimator not in ESTIMATORS:
            importlib.import_module(EXPERIMENTAL_MODULE)
        if estimator not in ESTIMATORS:
            raise ValueError(f"`{field}` must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
        estimator = ESTIMATORS[estimator]
    if not (isinstance(estimator, type) and issubclass(estimator, ZOEstimator)):
        raise ValueError(f"`{field}` must be a registered name or a ZOEstimator, got {estimator!r}")
    return estimator(field=kw_field, **kwargs)
