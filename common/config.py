"""Reading settings from the environment: read once at start, the variable's name in every error."""

from __future__ import annotations

import os
from collections.abc import Mapping


class SettingError(Exception):
    """A missing or invalid setting; the message starts with the variable's name."""


def env_str(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise SettingError(f"{name}: required but not set")
    return default


def env_opt(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


def env_int(env: Mapping[str, str], name: str, default: int, *, low: int = 0, high: int = 2**31) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(f"{name}: expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingError(f"{name}: must be between {low} and {high}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, low: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{name}: expected a number, got {raw!r}") from None
    if value < low:
        raise SettingError(f"{name}: must be at least {low}, got {value}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"{name}: expected true or false, got {raw!r}")


def env_url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str:
    value = env_str(env, name)
    if not value.startswith(tuple(f"{s}://" for s in schemes)):
        raise SettingError(f"{name}: expected a URL starting with {' or '.join(s + '://' for s in schemes)}")
    return value


def environ() -> Mapping[str, str]:
    return os.environ
