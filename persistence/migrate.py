"""Run alembic programmatically, so the migrations ship inside the installed package.

Every command goes through `_config` (where the scripts are, the database's URL) and through
migrations/env.py (how to connect), so `migrate`, `current`, `history` and `downgrade` of
``python -m persistence`` reach the database the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory


@dataclass(frozen=True)
class Revision:
    """One migration script: its id, the first line of its docstring, whether it is a head."""

    id: str
    doc: str
    head: bool


def sqlalchemy_url(database_url: str) -> str:
    """A SQLAlchemy asyncpg URL that hands `database_url` to asyncpg untouched, as its `dsn`.

    SQLAlchemy would otherwise pass each query parameter as a keyword of `asyncpg.connect()`,
    which has none for libpq's `sslmode`, `sslrootcert`, ... (TypeError): the migration would fail
    on exactly the TLS URLs the nodes accept. As a `dsn`, asyncpg parses the URL itself, the same
    way `persistence.store.Store.connect` does.
    """
    return f"postgresql+asyncpg:///?dsn={quote(database_url, safe='')}"


def _config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("persistence").joinpath("migrations")))
    if database_url is not None:
        # ConfigParser interpolation: the '%' of the quoted URL must not be taken for references.
        config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return config


def upgrade_head(database_url: str) -> None:
    command.upgrade(_config(database_url), "head")


def downgrade(database_url: str, target: str) -> None:
    """Undo migrations down to `target`: a revision id, ``base`` (an empty schema) or ``-N``
    (N steps below the database's revision). Raises alembic's CommandError for a target that
    is unknown or not below the database's revision."""
    command.downgrade(_config(database_url), target)


def current(database_url: str) -> tuple[str, ...]:
    """The database's revision (more than one only with branches); () when it is at base."""
    config = _config(database_url)
    script = ScriptDirectory.from_config(config)
    found: list[str] = []

    def read(revision: Any, context: MigrationContext) -> list[Any]:
        found.extend(context.get_current_heads())
        return []  # nothing to migrate: env.py only connects and reads the version table

    # What alembic's own `current` command does, returning the revisions instead of printing them.
    with EnvironmentContext(config, script, fn=read, dont_mutate=True):
        script.run_env()
    return tuple(found)


def revisions() -> list[Revision]:
    """Every migration, newest first (read from the scripts; no database needed)."""
    script = ScriptDirectory.from_config(_config())
    return [Revision(id=s.revision, doc=s.doc, head=s.is_head) for s in script.walk_revisions()]
