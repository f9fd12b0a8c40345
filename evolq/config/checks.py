"""The validators every config shares (one-line ``ConfigError``s) and ``field_default``."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError

__all__ = ["field_default", "check_int", "check_choice"]


def field_default(cls, name: str):
    """The default of dataclass field ``name`` (the CLI reads its defaults from here)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
