"""Token usage on runs: what the model counted for the attempt that ended the run.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    # NULL: the endpoint reported no usage (LLM_STREAM_USAGE off, or a server without it).
    op.execute("ALTER TABLE runs ADD COLUMN prompt_tokens integer, ADD COLUMN completion_tokens integer")
    # GET /v1/usage sums a user's ended runs over a time range.
    op.execute("CREATE INDEX runs_user_updated ON runs (user_id, updated_at) WHERE prompt_tokens IS NOT NULL")


def downgrade() -> None:
    op.execute("DROP INDEX runs_user_updated")
    op.execute("ALTER TABLE runs DROP COLUMN prompt_tokens, DROP COLUMN completion_tokens")
