"""Every SQL statement, as a named constant. `$1` is always the user id where a user is involved."""

FIND_SEND = """
SELECT m.id, m.conversation_id, m.run_id, m.seq FROM messages m WHERE m.user_id = $1 AND m.client_id = $2
"""
OWNS_CONVERSATION = "SELECT agent FROM conversations WHERE user_id = $1 AND id = $2"
# Sends to one conversation are serialised on its row, so two devices double-texting at once
# both see each other's run.
LOCK_CONVERSATION = """
SELECT agent, double_texting FROM conversations WHERE user_id = $1 AND id = $2 FOR UPDATE
"""
CONVERSATION_COLUMNS = "id, title, agent, double_texting, created_at, updated_at"
INSERT_CONVERSATION = f"""
INSERT INTO conversations (id, user_id, title, agent, double_texting) VALUES ($2, $1, $3, $4, $5)
RETURNING {CONVERSATION_COLUMNS}
"""
INSERT_USER_MESSAGE = """
WITH s AS (SELECT nextval('messages_n_seq') AS n)
INSERT INTO messages (n, pos, id, conversation_id, user_id, role, content, client_id, device, run_id)
SELECT s.n, 2 * s.n, $2, $3, $1, 'user', $4, $5, $6, $7 FROM s
ON CONFLICT (user_id, client_id) DO NOTHING
RETURNING id
"""
ACTIVE_RUNS = """
SELECT id FROM runs
WHERE conversation_id = $1 AND status IN ('waiting', 'queued', 'running', 'paused') ORDER BY created_at
"""
INSERT_RUN = """
INSERT INTO runs (id, conversation_id, user_id, message_id, status, policy, behind, supersedes)
VALUES ($2, $3, $1, $4, $5, $6, $7, $8)
"""
MARK_DISCARD = "UPDATE runs SET discard = true WHERE id = ANY($1::text[])"
SEND_RUN = "SELECT status, policy, behind, supersedes FROM runs WHERE id = $1"
TOUCH_CONVERSATION = "UPDATE conversations SET updated_at = now() WHERE user_id = $1 AND id = $2"
SET_MESSAGE_SEQ = "UPDATE messages SET seq = $3 WHERE user_id = $1 AND id = $2"

LIST_CONVERSATIONS = f"""
SELECT {CONVERSATION_COLUMNS} FROM conversations
WHERE user_id = $1 AND ($2::timestamptz IS NULL OR updated_at < $2)
ORDER BY updated_at DESC, id LIMIT $3
"""
GET_CONVERSATION = f"""
SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE user_id = $1 AND id = $2
"""
DELETE_CONVERSATION = "DELETE FROM conversations WHERE user_id = $1 AND id = $2 RETURNING id"
# Newest `limit` messages before cursor `pos`, returned oldest first ("newest last").
LIST_MESSAGES = """
SELECT * FROM (
    SELECT pos, id, role, content, device, run_id, tools, seq, created_at FROM messages
    WHERE user_id = $1 AND conversation_id = $2 AND ($3::bigint IS NULL OR pos < $3)
    ORDER BY pos DESC LIMIT $4
) page ORDER BY pos
"""

GET_RUN = """
SELECT conversation_id, status FROM runs WHERE user_id = $1 AND id = $2
"""
CANCEL_QUEUED_RUN = """
UPDATE runs SET status = 'cancelled', updated_at = now()
WHERE user_id = $1 AND id = $2 AND status IN ('waiting', 'queued')
RETURNING conversation_id, message_id, discard
"""
# A run is claimable when queued, or running under a lease that ran out (its worker died). One
# whose last question has its answer resumes from the question (what it had said and done then is
# kept with the question); any other starts over.
_RESUMING = "(question IS NOT NULL AND answer->>'request' = question->>'request')"
CLAIM_RUN = f"""
UPDATE runs SET status = 'running', attempts = attempts + 1, worker = $2,
    lease_until = now() + make_interval(secs => $3), updated_at = now(), agent_version = $4,
    partial = CASE WHEN {_RESUMING} THEN partial ELSE '' END,
    partial_tools = CASE WHEN {_RESUMING} THEN partial_tools ELSE '[]' END,
    partial_seq = CASE WHEN {_RESUMING} THEN partial_seq END,
    partial_epoch = CASE WHEN {_RESUMING} THEN partial_epoch END,
    question = CASE WHEN {_RESUMING} THEN question END,
    answer = CASE WHEN {_RESUMING} THEN answer END
WHERE id = $1 AND (status = 'queued' OR (status = 'running' AND lease_until < now()))
RETURNING user_id, conversation_id, message_id, attempts,
    (SELECT agent FROM conversations c WHERE c.id = runs.conversation_id) AS agent, question, answer
"""
# A run's question is stored before devices see it, so only answers to it are taken; an answer to
# the run's question before is forgotten (the run goes on from this one).
ASK_RUN = """
UPDATE runs SET question = $3::jsonb, answer = NULL, updated_at = now()
WHERE id = $1 AND worker = $2 AND status = 'running'
RETURNING id
"""
# The worker holding a run that asked its user a question lets it go: paused, no lease, until the
# answer (or the deadline). $3: the question, with the run's text and tool calls when it asked. If
# the answer came first (a device answered as the question went out), the run stays running and
# the worker goes on with it (the answer is returned).
PAUSE_RUN = """
UPDATE runs SET question = $3::jsonb, partial = $4, partial_tools = $5::jsonb, partial_seq = $6,
    partial_epoch = $7, updated_at = now(),
    status = CASE WHEN answer->>'request' = $3::jsonb->>'request' THEN 'running' ELSE 'paused' END,
    lease_until = CASE WHEN answer->>'request' = $3::jsonb->>'request' THEN lease_until END,
    paused_until = now() + make_interval(secs => $8)
WHERE id = $1 AND worker = $2 AND status = 'running'
RETURNING status, answer->>'text' AS answer
"""
# A device's answer to the run's question: the first one counts. A paused run goes back on the
# queue; a running one (its question just went out) finds it when it pauses. The answering device
# repeating itself changes nothing (a retry); another device's answer to a question already
# answered, or an answer to a question the run is not asking, is refused (no row).
ANSWER_RUN = """
UPDATE runs SET updated_at = now(), paused_until = NULL,
    answer = CASE WHEN answer->>'request' = $3 THEN answer
             ELSE jsonb_build_object('request', $3::text, 'text', $4::text, 'by', $5::text) END,
    status = CASE WHEN status = 'paused' THEN 'queued' ELSE status END
WHERE user_id = $1 AND id = $2 AND question->>'request' = $3
  AND (answer IS NULL OR answer->>'request' <> $3 OR answer->>'by' = $5)
  AND status IN ('running', 'paused', 'queued')
RETURNING status, conversation_id, answer->>'text' AS text, agent_version,
    (SELECT agent FROM conversations c WHERE c.id = runs.conversation_id) AS agent
"""
RUN_ANSWER = "SELECT status, answer FROM runs WHERE user_id = $1 AND id = $2"
# Paused runs whose answer did not come in time, for the worker's sweep to end failed.
EXPIRED_PAUSES = """
SELECT id, partial, partial_tools FROM runs WHERE status = 'paused' AND paused_until < now() LIMIT $1
"""
# A run that asked its user a question and holds no worker: paused, or queued again with the answer.
PAUSED_RUN = """
SELECT id, conversation_id, partial, partial_tools, partial_seq FROM runs
WHERE user_id = $1 AND id = $2 AND (status = 'paused' OR (status = 'queued' AND question IS NOT NULL))
"""
COUNT_PAUSED = "SELECT count(*) FROM runs WHERE status = 'paused'"
# LangGraph's saved state of ended runs (the worker deletes a run's as it ends it; a run ended
# elsewhere, cancelled while paused or expired, leaves it to this sweep).
PRUNE_CHECKPOINTS = [
    f"DELETE FROM {table} t USING runs r "
    "WHERE t.thread_id = r.id AND r.status IN ('completed', 'cancelled', 'failed')"
    for table in ("checkpoint_writes", "checkpoint_blobs", "checkpoints")
]
RENEW_LEASE = """
UPDATE runs SET lease_until = now() + make_interval(secs => $3)
WHERE id = $1 AND worker = $2 AND status = 'running' RETURNING id
"""
RUN_STATE = """
SELECT user_id, conversation_id, status, terminal_seq, answer_message_id, partial, error_code, error_message,
    prompt_tokens, completion_tokens
FROM runs WHERE id = $1
"""
HISTORY = """
SELECT role, content FROM messages
WHERE conversation_id = $1 AND pos <= (SELECT pos FROM messages WHERE id = $2)
ORDER BY pos
"""
INSERT_ASSISTANT_MESSAGE = """
INSERT INTO messages (pos, id, conversation_id, user_id, role, content, run_id, tools)
SELECT u.pos + 1, $1, $2, $3, 'assistant', $4, $5, $6::jsonb
FROM runs r JOIN messages u ON u.id = r.message_id WHERE r.id = $5
"""
DELETE_MESSAGE = "DELETE FROM messages WHERE id = $1"
FINISH_RUN = """
UPDATE runs SET status = $2, partial = $3, answer_message_id = $4, error_code = $5, error_message = $6,
    prompt_tokens = $7, completion_tokens = $8, lease_until = NULL, paused_until = NULL, updated_at = now()
WHERE id = $1 AND status IN ('waiting', 'queued', 'running', 'paused')
"""
LOCK_RUN = """
SELECT user_id, conversation_id, message_id, status, worker, discard FROM runs WHERE id = $1 FOR UPDATE
"""
# The next waiting run of a conversation goes on the job stream once none is queued or running.
PROMOTE_NEXT = """
UPDATE runs SET status = 'queued', updated_at = now()
WHERE id = (SELECT id FROM runs WHERE conversation_id = $1 AND status = 'waiting' ORDER BY created_at LIMIT 1)
  AND NOT EXISTS (SELECT 1 FROM runs WHERE conversation_id = $1 AND status IN ('queued', 'running', 'paused'))
RETURNING id, user_id, (SELECT agent FROM conversations c WHERE c.id = runs.conversation_id) AS agent
"""
LOCK_CONVERSATION_BY_ID = "SELECT id FROM conversations WHERE id = $1 FOR UPDATE"
# Waiting runs whose conversation has nothing queued or running (a promotion lost to a crash).
STRANDED_CONVERSATIONS = """
SELECT DISTINCT w.conversation_id FROM runs w
WHERE w.status = 'waiting' AND w.updated_at < now() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM runs a WHERE a.conversation_id = w.conversation_id
                  AND a.status IN ('queued', 'running', 'paused'))
LIMIT $2
"""
SET_TERMINAL_SEQ = "UPDATE runs SET terminal_seq = $2 WHERE id = $1"
SAVE_PARTIAL = """
UPDATE runs SET partial = $2, partial_seq = $3, partial_epoch = $4, partial_tools = $5::jsonb
WHERE id = $1 AND status = 'running'
"""
# Every run not yet ended counts: waiting, queued or running (index runs_user_status).
COUNT_RUNS_IN_FLIGHT = """
SELECT (SELECT count(*) FROM runs
        WHERE user_id = $1 AND status NOT IN ('completed', 'cancelled', 'failed')) AS in_flight,
       EXISTS (SELECT 1 FROM messages WHERE user_id = $1 AND client_id = $2) AS seen
"""
# Of many users at once (the sockets opening in one loop turn), each user's oldest first.
RUNS_IN_FLIGHT = """
SELECT user_id, id, conversation_id, status, partial, partial_seq, partial_epoch, partial_tools, question
FROM runs WHERE user_id = ANY($1::text[]) AND status IN ('queued', 'running', 'paused') ORDER BY created_at
"""
# Runs whose job may have been lost: queued for a while, or running on an expired lease.
STALE_RUNS = """
SELECT r.id, r.user_id, r.conversation_id, c.agent
FROM runs r JOIN messages m ON m.id = r.message_id JOIN conversations c ON c.id = r.conversation_id
WHERE m.seq IS NOT NULL  -- acked sends only: an unacked one is retried by its client
  AND ((r.status = 'queued' AND r.updated_at < now() - make_interval(secs => $1))
       OR (r.status = 'running' AND r.lease_until < now()))
ORDER BY r.created_at LIMIT $2
"""
TOUCH_RUN = "UPDATE runs SET updated_at = now() WHERE id = $1 AND status = 'queued'"

# The admin API (ws_node.admin): not scoped to one user, for operators only.
# Runs not yet ended, oldest first, of one user or of everyone; the age by the database's clock.
ADMIN_RUNS_IN_FLIGHT = """
SELECT id, user_id, conversation_id, status, worker, attempts, lease_until, created_at,
    extract(epoch FROM now() - created_at)::float8 AS age_s
FROM runs
WHERE status IN ('waiting', 'queued', 'running', 'paused') AND ($1::text IS NULL OR user_id = $1)
ORDER BY created_at LIMIT $2
"""
RUN_STATUSES = "SELECT id, status, error_code FROM runs WHERE id = ANY($1::text[])"
# The failed run a retry answers again, with its user message (gone: rolled back or deleted).
RETRY_SOURCE = """
SELECT r.user_id, r.conversation_id, r.message_id, r.status, r.answer_message_id, c.agent
FROM runs r JOIN messages m ON m.id = r.message_id JOIN conversations c ON c.id = r.conversation_id
WHERE r.id = $1
"""
# The tokens of a user's runs that ended since $2 (only those whose endpoint reported usage).
USAGE = """
SELECT count(*) AS runs, coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
    coalesce(sum(completion_tokens), 0) AS completion_tokens
FROM runs WHERE user_id = $1 AND updated_at >= $2 AND prompt_tokens IS NOT NULL
"""
# One run of the user's, as `GET /v1/runs/{id}` shows it (ws_node.http_runs), with the seq of the
# `message.created` that began it (its first event in the user's stream).
RUN_VIEW = """
SELECT r.id, r.conversation_id, r.status, r.attempts, r.partial, r.partial_seq, r.partial_epoch,
    r.answer_message_id, r.error_code, r.error_message, r.created_at, r.updated_at, m.seq AS message_seq,
    c.agent, r.agent_version
FROM runs r LEFT JOIN messages m ON m.id = r.message_id JOIN conversations c ON c.id = r.conversation_id
WHERE r.user_id = $1 AND r.id = $2
"""

# Lost ends (the worker's sweep, Worker.republish_lost_ends): runs whose end was published in the
# last $1 seconds, newest first, with the seq of the message that began them.
RECENT_ENDS = """
SELECT r.id, r.user_id, r.terminal_seq, r.end_epoch, m.seq AS message_seq
FROM runs r LEFT JOIN messages m ON m.id = r.message_id
WHERE r.terminal_seq IS NOT NULL AND r.updated_at > now() - make_interval(secs => $1)
ORDER BY r.updated_at DESC LIMIT $2
"""
# How long ago the user's stream was first seen in epoch $2 (now, when it is new).
SEE_EPOCH = """
WITH seen AS (
    INSERT INTO stream_epochs AS s (user_id, epoch) VALUES ($1, $2)
    ON CONFLICT (user_id) DO UPDATE SET epoch = EXCLUDED.epoch, seen_at = now()
    WHERE s.epoch <> EXCLUDED.epoch
    RETURNING seen_at
)
SELECT extract(epoch FROM now() - coalesce((SELECT seen_at FROM seen),
                                           (SELECT seen_at FROM stream_epochs WHERE user_id = $1)))::float8
"""
SET_END_EPOCH = "UPDATE runs SET end_epoch = $2 WHERE id = ANY($1::text[]) AND terminal_seq IS NOT NULL"
SET_END_AGAIN = "UPDATE runs SET terminal_seq = $2, end_epoch = $3 WHERE id = $1"
ENDED_RUN = """
SELECT user_id, conversation_id, status, attempts, discard, answer_message_id, partial, error_code,
    error_message, prompt_tokens, completion_tokens
FROM runs WHERE id = $1 AND status IN ('completed', 'cancelled', 'failed')
"""
