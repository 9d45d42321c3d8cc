"""Postgres persistence: conversations, messages and runs (asyncpg), schema owned by alembic.

Every query that serves a user is scoped by that user's id in its WHERE clause, never by a
check done afterwards in Python.
"""
