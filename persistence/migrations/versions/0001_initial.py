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
        -- What a message sent while a run is in flight does (docs/protocol.md, double-texting).
        double_texting text NOT NULL DEFAULT 'enqueue'
                    CHECK (double_texting IN ('enqueue', 'reject', 'interrupt', 'rollback')),
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX conversations_user ON conversations (user_id, updated_at DESC, id)",
    """
    CREATE TABLE messages (
        n               bigserial UNIQUE,
        -- Display and model order: a user message at 2n, its run's answer right after it at
        -- 2n+1, even when a later message was sent while the answer was being written.
        pos             bigint NOT NULL,
        id              text PRIMARY KEY,
        conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        user_id         text NOT NULL,
        role            text NOT NULL CHECK (role IN ('user', 'assistant')),
        content         text NOT NULL,
        client_id       text,
        device          text,
        run_id          text,
        -- An answer's tool calls: [{call, name, arguments, summary, error}]
        tools           jsonb NOT NULL DEFAULT '[]',
        seq             bigint,
        created_at      timestamptz NOT NULL DEFAULT now(),
        -- A send retried with the same id (another device, node or reconnect) is one message.
        UNIQUE (user_id, client_id)
    )
    """,
    "CREATE INDEX messages_conversation ON messages (conversation_id, pos)",
    """
    CREATE TABLE runs (
        id                text PRIMARY KEY,
        conversation_id   text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        user_id           text NOT NULL,
        message_id        text NOT NULL,
        -- waiting: behind another run of its conversation; queued: on the job stream
        status            text NOT NULL DEFAULT 'queued'
                          CHECK (status IN ('waiting', 'queued', 'running',
                                            'completed', 'cancelled', 'failed')),
        policy            text NOT NULL DEFAULT 'enqueue',
        behind            text,
        supersedes        text[] NOT NULL DEFAULT '{}',
        discard           boolean NOT NULL DEFAULT false,
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
    """CREATE INDEX runs_conversation_active ON runs (conversation_id, created_at)
       WHERE status IN ('waiting', 'queued', 'running')""",
]


def upgrade() -> None:
    # asyncpg prepares each statement, so they go one at a time.
    for statement in SCHEMA:
        op.execute(statement)


def downgrade() -> None:
    for table in ("runs", "messages", "conversations"):
        op.execute(f"DROP TABLE {table}")
