"""Run alembic programmatically, so the migrations ship inside the installed package."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config


def sqlalchemy_url(database_url: str) -> str:
    """`postgresql://...` as SQLAlchemy's asyncpg dialect wants it."""
    _, rest = database_url.split("://", 1)
    return f"postgresql+asyncpg://{rest}"


def upgrade_head(database_url: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(resources.files("persistence").joinpath("migrations")))
    # ConfigParser interpolation: a password with '%' must not be taken for a reference.
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    command.upgrade(config, "head")
