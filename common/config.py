"""Settings from the environment, each declared once: its variable, default, parser and docs line.

A process's settings are a frozen dataclass whose fields are declared with `setting`, `optional`,
`required` or `computed`: the variable's name, its default (written there and nowhere else), the
parser with its bounds, and the one line docs/operations.md shows. `read` reads a class's
declarations from the environment, the variable's name starting every error; the class's own
``from_env`` then adds what spans several variables (computed defaults, cross-checks) and builds
it. Read once at start in ``__main__`` and passed down::

    @dataclass(frozen=True, kw_only=True)
    class Settings(SharedSettings):
        port: int = setting("PORT", "8080", integer(1, 65535), "public port")

Defaults are written as an operator would write the variable (``"8080"``, ``"30"`` for a ``*_MS``
variable read as seconds), so one parser reads both the environment and the default (a default
outside its own bounds fails at import) and the docs show the default unchanged.

`declared` lists a class's settings; ``python -m common.config MODULE:CLASS ...`` prints each
class's own as a markdown table, the form docs/operations.md holds them in (tests/test_settings.py
checks that it does).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

# (variable, its text: stripped, never empty) -> the value; raises SettingError naming the variable.
Parser = Callable[[str, str], T]

_KEY = "common.config.setting"  # the field metadata key holding its `Setting`


class SettingError(Exception):
    """A missing or invalid setting; the message starts with the variable's name."""


@dataclass(frozen=True)
class Setting:
    """One environment variable of a settings class: how it is read, and its row in the docs."""

    variable: str
    parse: Parser[Any]
    doc: str
    default: Any = None  # the value when the variable is unset or blank
    required: bool = False  # unset or blank is an error
    shown: str = "none"  # the docs' default cell
    secret: bool = False  # never shown: not in repr, logs or errors

    def read(self, env: Mapping[str, str]) -> Any:
        text = env.get(self.variable, "").strip()
        if text:
            return self.parse(self.variable, text)
        if self.required:
            raise SettingError(f"{self.variable}: required but not set")
        return self.default


# -- declaring -------------------------------------------------------------------------------


def setting(variable: str, default: str, parse: Parser[T], doc: str, *, shown: str | None = None) -> T:
    """A field read from `variable`, `default` (as the environment would spell it) when unset."""
    value = parse(variable, default)
    shown = _shown(default) if shown is None else shown
    return field(default=value, metadata={_KEY: Setting(variable, parse, doc, value, shown=shown)})


def optional(
    variable: str, parse: Parser[T], doc: str, *, shown: str = "none", secret: bool = False
) -> T | None:
    """A field read from `variable`, None when unset; `secret`: never shown in a repr."""
    return field(default=None, metadata={_KEY: Setting(variable, parse, doc, shown=shown, secret=secret)})


def required(variable: str, parse: Parser[T], doc: str) -> T:
    """A field read from `variable`, which must be set."""
    return cast(T, field(metadata={_KEY: Setting(variable, parse, doc, required=True, shown="required")}))


def computed(variable: str, parse: Parser[T], doc: str, *, shown: str) -> T:
    """A field read from `variable` whose default the class's ``from_env`` computes (`read` gives
    None when unset); `shown` describes that default in the docs."""
    return cast(T, field(metadata={_KEY: Setting(variable, parse, doc, shown=shown)}))


def _shown(default: str) -> str:
    if not default:
        return "empty"
    if default in ("true", "false") or re.fullmatch(r"[0-9]+(\.[0-9]+)?", default):
        return default
    return f"`{default}`"


# -- reading and listing ---------------------------------------------------------------------


def declared(cls: type[Any], *, inherited: bool = True) -> dict[str, Setting]:
    """A settings class's declarations by field name, in order (a base class's first); with
    ``inherited=False`` only those the class declares itself."""
    own = vars(cls).get("__annotations__", {})
    return {f.name: f.metadata[_KEY] for f in fields(cls)
            if _KEY in f.metadata and (inherited or f.name in own)}


def read(cls: type[Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Field name -> value for every declaration of `cls`, in order; a computed field whose variable
    is unset reads None. Raises SettingError naming the first invalid variable."""
    return {name: spec.read(env) for name, spec in declared(cls).items()}


def markdown(settings: Iterable[Setting]) -> str:
    """`settings` as a docs table: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{spec.variable}` | {spec.shown} | {spec.doc} |" for spec in settings]
    return "\n".join(rows)


# -- parsers ---------------------------------------------------------------------------------


def text(variable: str, value: str) -> str:
    return value


def comma_list(variable: str, value: str) -> tuple[str, ...]:
    """``a, b,,c`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def host_ports(variable: str, value: str) -> tuple[str, ...]:
    """``a:1, b:2`` -> ``("a:1", "b:2")``, each checked to be ``host:port``."""
    items = comma_list(variable, value)
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingError(f"{variable}: expected host:port items, got {item!r}")
    return items


def boolean(variable: str, value: str) -> bool:
    value = value.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"{variable}: expected true or false, got {value!r}")


def choice(*options: str) -> Parser[str]:
    def parse(variable: str, value: str) -> str:
        if value.strip().lower() not in options:
            raise SettingError(f"{variable}: expected one of {', '.join(options)}, got {value!r}")
        return value.strip().lower()

    return parse


def integer(low: int = 0, high: int = 2**31) -> Parser[int]:
    def parse(variable: str, value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise SettingError(f"{variable}: expected an integer, got {value!r}") from None
        if not low <= number <= high:
            raise SettingError(f"{variable}: must be between {low} and {high}, got {number}")
        return number

    return parse


def number(low: float = 0.0) -> Parser[float]:
    def parse(variable: str, value: str) -> float:
        try:
            result = float(value)
        except ValueError:
            raise SettingError(f"{variable}: expected a number, got {value!r}") from None
        if result < low:
            raise SettingError(f"{variable}: must be at least {low}, got {result}")
        return result

    return parse


def millis(low: int, high: int) -> Parser[float]:
    """Whole milliseconds in [low, high] (a ``*_MS`` variable), read as seconds."""
    whole = integer(low, high)
    return lambda variable, value: whole(variable, value) / 1000


def zero_is_off(parse: Parser[int]) -> Parser[int | None]:
    """`parse`, with 0 read as None (a port that is off)."""
    return lambda variable, value: parse(variable, value) or None


def min_chars(least: int) -> Parser[str]:
    def parse(variable: str, value: str) -> str:
        if len(value) < least:
            raise SettingError(f"{variable}: must be at least {least} characters")
        return value

    return parse


def url(*schemes: str) -> Parser[str]:
    prefixes = tuple(f"{scheme}://" for scheme in schemes)

    def parse(variable: str, value: str) -> str:
        if not value.startswith(prefixes):
            raise SettingError(f"{variable}: expected a URL starting with {' or '.join(prefixes)}")
        return value

    return parse


def http_url(variable: str, value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise SettingError(f"{variable}: expected an http:// or https:// URL")
    return value


# -- what every process reads ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, repr=False)
class SharedSettings:
    """The settings both the node and the worker read. Both write the users' streams, so the
    prefix and the history bounds must agree between them."""

    redis_url: str = required("REDIS_URL", url("redis", "rediss", "unix"),
                              "`redis://`, `rediss://` or `unix://` URL of the Redis primary; with "
                              "`REDIS_CLUSTER`, of any node of the cluster (a seed)")
    redis_cluster: bool = setting(
        "REDIS_CLUSTER", "false", boolean,
        "`true`: Redis is a Redis Cluster (7+): the client follows the slots, users' frames go over "
        "sharded Pub/Sub (`SPUBLISH`/`SSUBSCRIBE`), each to the shard that owns the user. **Nodes and "
        "workers must agree**")
    redis_sentinels: tuple[str, ...] = setting(
        "REDIS_SENTINELS", "", host_ports,
        "comma-separated `host:port` of Redis Sentinels: the primary is the one they name "
        "`REDIS_SENTINEL_MASTER`, followed through failovers; `REDIS_URL` then gives only the "
        "credentials and database number", shown="none")
    redis_sentinel_master: str = setting(
        "REDIS_SENTINEL_MASTER", "chorus", text, "the name the Sentinels monitor the primary under")
    database_url: str = required("DATABASE_URL", url("postgresql", "postgres"),
                                 "`postgresql://` or `postgres://` URL; TLS parameters such as `sslmode` are "
                                 "honoured. The migration reads only this")
    database_statement_cache_size: int = setting(
        "DATABASE_STATEMENT_CACHE_SIZE", "100", integer(0, 10_000),
        "prepared statements asyncpg keeps per Postgres connection, 0 to 10000 (100 is asyncpg's own "
        "default); 0 also makes the worker's checkpointer (psycopg) prepare none. **0 behind PgBouncer in "
        "transaction mode**, which cannot keep a connection's prepared statements (see [Postgres, "
        "migrations and PgBouncer](#postgres-migrations-and-pgbouncer))")
    internal_port: int | None = setting(
        "INTERNAL_PORT", "0", zero_is_off(integer(0, 65535)),
        "port of the health server (`/healthz`, `/readyz`), 0 to 65535. The chart sets 9090 (node) and "
        "9091 (worker)", shown="0 (off)")
    redis_prefix: str = setting("REDIS_PREFIX", "chorus", text,
                                "prefix of every Redis key; lets several deployments share one Redis. "
                                "**Nodes and workers must agree**")
    history_max: int = setting("HISTORY_MAX_EVENTS", "10000", integer(low=10),
                               "events kept per user for resuming (at least 10). A device further behind "
                               "than this gets `resync` and reloads over REST. Both components write the "
                               "stream: keep them equal")
    history_ttl_s: int = setting("HISTORY_TTL_SECONDS", "86400", integer(low=60),
                                 "a user's stream expires this long after their last event (at least 60); a "
                                 "device returning later gets `resync` (new epoch). Keep equal on both "
                                 "components")
    log_level: str = setting("LOG_LEVEL", "INFO", text, "`DEBUG`, `INFO`, `WARNING`, `ERROR`")
    log_format: str = setting("LOG_FORMAT", "json", choice("json", "text"),
                              "`json`: one JSON object per line, with the process, user, device, run and "
                              "trace where known; `text`: for people (the local cluster's choice)")
    redis_pool_size: int = setting(
        "REDIS_POOL_SIZE", "0", integer(0, 100_000),
        "most Redis connections the process opens (Pub/Sub not counted); 0 sizes it from the load: 256 "
        "for a node, `WORKER_CONCURRENCY` + 16 for a worker. A command waits for a free connection "
        "rather than fail", shown="0 (from the load)")
    redis_pool_wait_s: float = setting(
        "REDIS_POOL_WAIT_SECONDS", "30", number(low=0.1),
        "longest wait for a free pooled Redis connection; past it the command fails as a bug (the pool "
        "is too small), never as a Redis outage (at least 0.1)")

    def __repr__(self) -> str:
        # URLs may carry passwords and secrets are secrets: a logged settings object shows neither.
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            declared = f.metadata.get(_KEY)
            if value is None:
                continue
            if declared is not None and declared.secret:
                value = "***"
            elif isinstance(value, str) and "://" in value:
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***``: safe to log."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparseable url>"
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


# -- helpers for a variable read outside a settings class ------------------------------------


def env_opt(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


def env_url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str:
    return str(Setting(name, url(*schemes), "", required=True).read(env))


def environ() -> Mapping[str, str]:
    return os.environ


def rewrite_tables(text: str, sections: Mapping[str, type[Any]]) -> str:
    """`text` (markdown) with the table under each ``### <heading>`` of `sections` replaced by that
    class's own declarations."""
    for heading, cls in sections.items():
        start = text.index("| variable |", text.index(f"### {heading}\n"))
        end = start
        for line in text[start:].splitlines(keepends=True):
            if not line.startswith("|"):
                break
            end += len(line)
        text = text[:start] + markdown(declared(cls, inherited=False).values()) + "\n" + text[end:]
    return text


def main(argv: Sequence[str]) -> int:
    """``python -m common.config [--write FILE] HEADING=MODULE:CLASS ...``: each class's own settings
    as a docs table; with ``--write``, rewritten in place under each ``### HEADING`` of FILE."""
    target = None
    if argv[:1] == ["--write"]:
        target, argv = Path(argv[1]), argv[2:]
    sections = {}
    for arg in argv:
        heading, _, path = arg.rpartition("=")
        module, _, name = path.partition(":")
        sections[heading or name] = getattr(importlib.import_module(module), name)
    if target is not None:
        target.write_text(rewrite_tables(target.read_text(), sections))
        return 0
    for index, cls in enumerate(sections.values()):
        print(("\n" if index else "") + markdown(declared(cls, inherited=False).values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
