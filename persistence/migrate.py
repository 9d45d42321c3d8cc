"""Run alembic programmatically, so the migrations ship inside the installed package."""

from __future__ import annotations

from importlib import resources
from urllib.parse import quote

from alembic import command
from alembic.config import Config


def sqlalchemy_url(database_url: str) -> str:
    """A SQLAlchemy asyncpg URL that hands `database_url` to asyncpg untouched, as its `dsn`.

    SQLAlchemy would otherwise pass each query parameter as a keyword of `asyncpg.connect()`,
    which has none for libpq's `sslmode`, `sslrootcert`, ... (TypeError): the migration would fail
    on exactly the TLS URLs the nodes accept. As a `dsn`, asyncpg parses the URL itself, the same
    way `persistence.store.Store.connect` does.
    """
    return f"postgresql+asyncpg:///?dsn={quote(database_url, safe='')}"


def upgrade_head(database_url: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(resources.files("persistence").joinpath("migrations")))
    # ConfigParser interpolation: the '%' of the quoted URL must not be taken for references.
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    command.upgrade(config, "head")
