"""Conversations, messages and runs.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None

SCHEMA = [
    """
    CREATE TABLE conversations (
        id          text PRIMARY KEY,
        user_id     text NOT NULL,
        title       text NOT NULL DEFAULT '',
        agent       text NOT NULL DEFAULT 'default',
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX conversations_user ON conversations (user_id, updated_at DESC, id)",
    """
    CREATE TABLE messages (
        n               bigserial UNIQUE,
        id              text PRIMARY KEY,
        conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        user_id         text NOT NULL,
        role            text NOT NULL CHECK (role IN ('user', 'assistant')),
        content         text NOT NULL,
        client_id       text,
        device          text,
        run_id          text,
        seq             bigint,
        created_at      timestamptz NOT NULL DEFAULT now(),
        -- A send retried with the same id (another device, node or reconnect) is one message.
        UNIQUE (user_id, client_id)
    )
    """,
    "CREATE INDEX messages_conversation ON messages (conversation_id, n)",
    """
    CREATE TABLE runs (
        id                text PRIMARY KEY,
        conversation_id   text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        user_id           text NOT NULL,
        message_id        text NOT NULL,
        status            text NOT NULL DEFAULT 'queued'
                          CHECK (status IN ('queued', 'running', 'completed', 'cancelled', 'failed')),
        attempts          integer NOT NULL DEFAULT 0,
        worker            text,
        lease_until       timestamptz,
        answer_message_id text,
        partial           text NOT NULL DEFAULT '',
        partial_seq       bigint,
        partial_epoch     text,
        error_code        text,
        error_message     text,
        terminal_seq      bigint,
        created_at        timestamptz NOT NULL DEFAULT now(),
        updated_at        timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX runs_user_status ON runs (user_id, status)",
    "CREATE INDEX runs_unfinished ON runs (status, lease_until) WHERE status IN ('queued', 'running')",
]


def upgrade() -> None:
    # asyncpg prepares each statement, so they go one at a time.
    for statement in SCHEMA:
        op.execute(statement)


def downgrade() -> None:
    for table in ("runs", "messages", "conversations"):
        op.execute(f"DROP TABLE {table}")
