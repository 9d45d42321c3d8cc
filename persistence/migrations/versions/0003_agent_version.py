"""Agent pools: the version of the agent that served a run (a canary's share is visible per run).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # NULL: an unversioned agent (or a run no worker claimed yet).
    op.execute("ALTER TABLE runs ADD COLUMN agent_version text")


def downgrade() -> None:
    op.execute("ALTER TABLE runs DROP COLUMN agent_version")
