"""Every SQL statement, as a named constant. `$1` is always the user id where a user is involved."""

FIND_SEND = """
SELECT m.id, m.conversation_id, m.run_id, m.seq FROM messages m WHERE m.user_id = $1 AND m.client_id = $2
"""
OWNS_CONVERSATION = "SELECT agent FROM conversations WHERE user_id = $1 AND id = $2"
INSERT_CONVERSATION = """
INSERT INTO conversations (id, user_id, title, agent) VALUES ($2, $1, $3, $4)
RETURNING id, title, agent, created_at, updated_at
"""
INSERT_USER_MESSAGE = """
INSERT INTO messages (id, conversation_id, user_id, role, content, client_id, device, run_id)
VALUES ($2, $3, $1, 'user', $4, $5, $6, $7)
ON CONFLICT (user_id, client_id) DO NOTHING
RETURNING id
"""
INSERT_RUN = "INSERT INTO runs (id, conversation_id, user_id, message_id) VALUES ($2, $3, $1, $4)"
TOUCH_CONVERSATION = "UPDATE conversations SET updated_at = now() WHERE user_id = $1 AND id = $2"
SET_MESSAGE_SEQ = "UPDATE messages SET seq = $3 WHERE user_id = $1 AND id = $2"

LIST_CONVERSATIONS = """
SELECT id, title, agent, created_at, updated_at FROM conversations
WHERE user_id = $1 AND ($2::timestamptz IS NULL OR updated_at < $2)
ORDER BY updated_at DESC, id LIMIT $3
"""
GET_CONVERSATION = """
SELECT id, title, agent, created_at, updated_at FROM conversations WHERE user_id = $1 AND id = $2
"""
DELETE_CONVERSATION = "DELETE FROM conversations WHERE user_id = $1 AND id = $2 RETURNING id"
# Newest `limit` messages before cursor `n`, returned oldest first ("newest last").
LIST_MESSAGES = """
SELECT * FROM (
    SELECT n, id, role, content, device, run_id, seq, created_at FROM messages
    WHERE user_id = $1 AND conversation_id = $2 AND ($3::bigint IS NULL OR n < $3)
    ORDER BY n DESC LIMIT $4
) page ORDER BY n
"""

GET_RUN = """
SELECT id, conversation_id, message_id, status, partial, partial_seq, terminal_seq, attempts
FROM runs WHERE user_id = $1 AND id = $2
"""
CANCEL_QUEUED_RUN = """
UPDATE runs SET status = 'cancelled', updated_at = now()
WHERE user_id = $1 AND id = $2 AND status = 'queued' RETURNING conversation_id
"""
# A run is claimable when queued, or running under a lease that ran out (its worker died).
CLAIM_RUN = """
UPDATE runs SET status = 'running', attempts = attempts + 1, worker = $2,
    lease_until = now() + make_interval(secs => $3), updated_at = now(),
    partial = '', partial_seq = NULL, partial_epoch = NULL
WHERE id = $1 AND (status = 'queued' OR (status = 'running' AND lease_until < now()))
RETURNING user_id, conversation_id, message_id, attempts
"""
RENEW_LEASE = """
UPDATE runs SET lease_until = now() + make_interval(secs => $3)
WHERE id = $1 AND worker = $2 AND status = 'running' RETURNING id
"""
RUN_STATE = """
SELECT user_id, conversation_id, status, terminal_seq, answer_message_id, partial, error_code, error_message
FROM runs WHERE id = $1
"""
HISTORY = """
SELECT role, content FROM messages
WHERE conversation_id = $1 AND n <= (SELECT n FROM messages WHERE id = $2)
ORDER BY n
"""
INSERT_ASSISTANT_MESSAGE = """
INSERT INTO messages (id, conversation_id, user_id, role, content, run_id)
VALUES ($1, $2, $3, 'assistant', $4, $5)
"""
FINISH_RUN = """
UPDATE runs SET status = $2, partial = $3, answer_message_id = $4, error_code = $5, error_message = $6,
    lease_until = NULL, updated_at = now()
WHERE id = $1 AND status IN ('queued', 'running')
RETURNING user_id, conversation_id
"""
LOCK_RUN = "SELECT user_id, conversation_id, status, worker FROM runs WHERE id = $1 FOR UPDATE"
SET_TERMINAL_SEQ = "UPDATE runs SET terminal_seq = $2 WHERE id = $1"
SAVE_PARTIAL = """
UPDATE runs SET partial = $2, partial_seq = $3, partial_epoch = $4 WHERE id = $1 AND status = 'running'
"""
RUNS_IN_FLIGHT = """
SELECT id, conversation_id, status, partial, partial_seq, partial_epoch FROM runs
WHERE user_id = $1 AND status IN ('queued', 'running') ORDER BY created_at
"""
# Runs whose job may have been lost: queued for a while, or running on an expired lease.
STALE_RUNS = """
SELECT r.id, r.user_id, r.conversation_id FROM runs r JOIN messages m ON m.id = r.message_id
WHERE m.seq IS NOT NULL  -- acked sends only: an unacked one is retried by its client
  AND ((r.status = 'queued' AND r.updated_at < now() - make_interval(secs => $1))
       OR (r.status = 'running' AND r.lease_until < now()))
ORDER BY r.created_at LIMIT $2
"""
TOUCH_RUN = "UPDATE runs SET updated_at = now() WHERE id = $1 AND status = 'queued'"
