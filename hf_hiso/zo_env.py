"""Zeroth-order settings from the environment, for scripts whose arguments have no `zo_*` fields.

A script written for the stock `Trainer` parses a plain `TrainingArguments`, so `--zo_num_directions 1` is refused by
its parser. As accelerate reads `ACCELERATE_*`, `HiSoTrainer` reads `HISO_<FIELD>` (the field name upper-cased:
`HISO_ZO_NUM_DIRECTIONS=1`, `HISO_ZO_PRECONDITIONER=false`) for every `zo_*` setting. Precedence, per setting:

    a field of the arguments object (`HiSoConfig`, or its command-line flag)  >  HISO_<FIELD>  >  the HiSo default
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any, get_type_hints

from transformers.utils import logging

if TYPE_CHECKING:
    from .hiso_config import ZOArguments

logger = logging.get_logger(__name__)

ENV_PREFIX = "HISO_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def env_name(field_name: str) -> str:
    """`zo_num_directions` -> `HISO_ZO_NUM_DIRECTIONS`."""
    return ENV_PREFIX + field_name.upper()


def _parse(variable: str, raw: str, kind: Any, choices: list[str] | None) -> Any:
    text = raw.strip()
    if kind is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise ValueError(f"`{variable}` must be one of {TRUE_WORDS + FALSE_WORDS}, got {raw!r}")
    if choices is not None and text not in choices:
        raise ValueError(f"`{variable}` must be one of {choices}, got {raw!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            allowed = "an integer" if kind is int else "a number"
            raise ValueError(f"`{variable}` must be {allowed}, got {raw!r}") from None
    return text


def environment_settings(cls: type[ZOArguments], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The `zo_*` settings set by `HISO_ZO_*` variables, parsed to their field types. A value that does not parse, or a
    `HISO_ZO_*` variable that names no setting (a typo would otherwise be silently ignored), raises a `ValueError`
    naming the variable."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    known = {env_name(f.name): f for f in fields(cls)}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX + "ZO_") and k not in known)
    if unknown:
        raise ValueError(f"Unknown zeroth-order setting(s) in the environment: {unknown}; allowed: {sorted(known)}")
    return {
        f.name: _parse(variable, environ[variable], hints[f.name], f.metadata.get("choices"))
        for variable, f in known.items()
        if variable in environ
    }


def resolve_zo_arguments(cls: type[ZOArguments], args: Any) -> tuple[ZOArguments, dict[str, str]]:
    """The effective `zo_*` settings for `args` and where each came from: `"config"` (a field of `args`), `"env"`
    (its `HISO_ZO_*` variable) or `"default"`. Checked like a `HiSoConfig`; a bad value from the environment raises
    a `ValueError` that names the variable."""
    from_env = environment_settings(cls)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in fields(cls):
        if hasattr(args, f.name):
            values[f.name], sources[f.name] = getattr(args, f.name), "config"
            if f.name in from_env and from_env[f.name] != values[f.name]:
                logger.warning(
                    f"`{env_name(f.name)}` is ignored: the arguments set `{f.name}={values[f.name]!r}`, which takes "
                    "precedence over the environment."
                )
        elif f.name in from_env:
            values[f.name], sources[f.name] = from_env[f.name], "env"
        else:
            sources[f.name] = "default"
    out = cls(**values)
    try:
        out.check_zo()
    except ValueError as err:
        named = [n for n, source in sources.items() if source == "env" and f"`{n}`" in str(err)]
        culprits = [f"{env_name(n)}={os.environ[env_name(n)]!r}" for n in named]
        if culprits:
            raise ValueError(f"{err} (set in the environment: {', '.join(culprits)})") from None
        raise
    return out, sources


def describe_zo_settings(settings: ZOArguments, sources: dict[str, str]) -> str:
    """One line: every effective `zo_*` setting with its source, e.g. `zo_num_directions=1 (env)`."""
    parts = [f"{f.name}={getattr(settings, f.name)!r} ({sources.get(f.name, 'default')})" for f in fields(settings)]
    return "Zeroth-order settings: " + ", ".join(parts)
