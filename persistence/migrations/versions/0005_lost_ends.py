"""Lost ends: the epoch a run's end was last published in, and when each user's epoch was first seen.

A Redis that loses writes it had acknowledged (or comes back empty) starts a new epoch; devices
resync to its head, so a run whose end was among the lost writes, or landed in the new epoch
before a device resynced past it, reaches them only over REST. The worker's sweep publishes such
an end again, once per epoch (`agent_worker.worker.Worker.republish_lost_ends`): `end_epoch` is
the epoch it last checked or published the run's end in, `stream_epochs` when a user's current
epoch was first seen (a sweep waits until devices have resynced to it).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.execute("ALTER TABLE runs ADD COLUMN end_epoch text")
    # The sweep reads the ends of the last minutes only (set_terminal_seq follows FINISH_RUN,
    # which set updated_at).
    op.execute("CREATE INDEX runs_recent_ends ON runs (updated_at) WHERE terminal_seq IS NOT NULL")
    op.execute("""CREATE TABLE stream_epochs (
                      user_id  text PRIMARY KEY,
                      epoch    text NOT NULL,
                      seen_at  timestamptz NOT NULL DEFAULT now()
                  )""")


def downgrade() -> None:
    op.execute("DROP TABLE stream_epochs")
    op.execute("DROP INDEX runs_recent_ends")
    op.execute("ALTER TABLE runs DROP COLUMN end_epoch")
