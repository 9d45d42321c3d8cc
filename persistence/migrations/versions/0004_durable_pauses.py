"""Durable pauses: a run waiting for its user's answer is `paused` in Postgres, holding no worker.

The question it asked (`question`: request, prompt, and the LangGraph checkpoint it paused at), the
first answer (`answer`: request, text), the deadline for that answer (`paused_until`) and the tool
calls so far (`partial_tools`, with `partial`) are on the run; the graph's own state is in
LangGraph's Postgres checkpointer tables (`langgraph-checkpoint-postgres`), created here.

Revision ID: 0004
Revises: 0003
"""

from alembic import op
from langgraph.checkpoint.postgres.base import BasePostgresSaver

revision = "0004"
down_revision = "0003"

_STATUSES_BEFORE = "('waiting', 'queued', 'running', 'completed', 'cancelled', 'failed')"
_CHECKPOINT_TABLES = ("checkpoint_writes", "checkpoint_blobs", "checkpoints", "checkpoint_migrations")


def upgrade() -> None:
    # LangGraph's checkpointer tables first, by its own numbered migrations (the worker's `setup()`
    # at start applies any a later langgraph-checkpoint-postgres adds). CREATE INDEX CONCURRENTLY
    # cannot run in a transaction; all of it is IF NOT EXISTS, so a migration that fails after
    # this block runs again cleanly (the block commits on its own).
    with op.get_context().autocommit_block():
        op.execute(BasePostgresSaver.MIGRATIONS[0])
        for version, migration in enumerate(BasePostgresSaver.MIGRATIONS[1:], 1):
            op.execute(migration)
            op.execute(f"INSERT INTO checkpoint_migrations (v) VALUES ({version}) ON CONFLICT DO NOTHING")
    op.execute("ALTER TABLE runs DROP CONSTRAINT runs_status_check")
    op.execute("""ALTER TABLE runs ADD CONSTRAINT runs_status_check
                  CHECK (status IN ('waiting', 'queued', 'running', 'paused',
                                    'completed', 'cancelled', 'failed'))""")
    op.execute("""ALTER TABLE runs ADD COLUMN question jsonb, ADD COLUMN answer jsonb,
                  ADD COLUMN paused_until timestamptz,
                  ADD COLUMN partial_tools jsonb NOT NULL DEFAULT '[]'""")
    # A paused run is still in flight: its conversation's next run waits behind it.
    op.execute("DROP INDEX runs_conversation_active")
    op.execute("""CREATE INDEX runs_conversation_active ON runs (conversation_id, created_at)
                  WHERE status IN ('waiting', 'queued', 'running', 'paused')""")
    op.execute("CREATE INDEX runs_paused ON runs (paused_until) WHERE status = 'paused'")


def downgrade() -> None:
    for table in _CHECKPOINT_TABLES:
        op.execute(f"DROP TABLE IF EXISTS {table}")
    op.execute("DROP INDEX runs_paused")
    op.execute("DROP INDEX runs_conversation_active")
    op.execute("""CREATE INDEX runs_conversation_active ON runs (conversation_id, created_at)
                  WHERE status IN ('waiting', 'queued', 'running')""")
    # Paused runs cannot be kept as such: they end failed, as an unanswered question would.
    op.execute("""UPDATE runs SET status = 'failed', error_code = 'input_timeout',
                  error_message = 'the run was paused when the database was downgraded'
                  WHERE status = 'paused'""")
    op.execute("ALTER TABLE runs DROP COLUMN question, DROP COLUMN answer, DROP COLUMN paused_until, "
               "DROP COLUMN partial_tools")
    op.execute("ALTER TABLE runs DROP CONSTRAINT runs_status_check")
    op.execute(f"ALTER TABLE runs ADD CONSTRAINT runs_status_check CHECK (status IN {_STATUSES_BEFORE})")
