"""`python -m persistence` as an operator runs it: a subprocess against a real Postgres, a database
of each test's own."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import asyncpg
import pytest

from loadtest.procs import REPO_ROOT, PostgresServer
from persistence.migrate import revisions

REVISIONS = revisions()  # newest first
HEAD, HEAD_DOC = REVISIONS[0].id, REVISIONS[0].doc
BEFORE_HEAD = REVISIONS[1].id if len(REVISIONS) > 1 else "base"
TABLES = ("conversations", "messages", "runs")


@pytest.fixture
def database_url(postgres: PostgresServer) -> str:
    return postgres.create_database(f"cli_{uuid.uuid4().hex[:10]}")


def cli(*args: str, database_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "persistence", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO_ROOT, check=False)


def ok(*args: str, database_url: str) -> str:
    done = cli(*args, database_url=database_url)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


def tables(database_url: str) -> set[str]:
    """Which of Chorus's tables the database has."""
    async def read() -> set[str]:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE tablename = ANY($1)", list(TABLES))
        finally:
            await conn.close()
        return {r["tablename"] for r in rows}

    return asyncio.run(read())


def test_migrate_current_history_downgrade_and_back(database_url: str) -> None:
    # A new database: nothing applied, history marks base as current.
    assert ok("current", database_url=database_url).strip() == (
        f"current: base (not at head: head is {HEAD}; run `migrate`)")
    assert ok("history", database_url=database_url).splitlines()[-1] == "base  no tables  (current)"

    assert ok("migrate", database_url=database_url).strip() == "migrations: at head"
    assert tables(database_url) == set(TABLES)
    assert ok("current", database_url=database_url).strip() == f"current: {HEAD} (head)"
    history = ok("history", database_url=database_url).splitlines()
    assert history[0] == f"{HEAD}  {HEAD_DOC}  (head, current)"  # newest first
    assert history[-1] == "base  no tables"
    assert len(history) == len(revisions()) + 1

    out = ok("downgrade", "base", database_url=database_url)
    assert out.strip() == f"downgraded; current: base (not at head: head is {HEAD}; run `migrate`)"
    assert tables(database_url) == set()
    assert "not at head" in ok("current", database_url=database_url)
    history = ok("history", database_url=database_url).splitlines()
    assert history[0] == f"{HEAD}  {HEAD_DOC}  (head)"
    assert history[-1] == "base  no tables  (current)"

    assert ok("migrate", database_url=database_url).strip() == "migrations: at head"
    assert tables(database_url) == set(TABLES)
    # A relative target, as alembic takes it: one step down from head.
    ok("downgrade", "-1", database_url=database_url)
    assert ok("current", database_url=database_url).strip().startswith(f"current: {BEFORE_HEAD} (")
    ok("migrate", database_url=database_url)
    assert ok("current", database_url=database_url).strip() == f"current: {HEAD} (head)"


@pytest.mark.parametrize("args", [(), ("bogus",), ("downgrade",), ("current", "extra"), ("migrate", "head")])
def test_bad_arguments_exit_2_with_the_usage(args: tuple[str, ...], database_url: str) -> None:
    done = cli(*args, database_url=database_url)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "usage: python -m persistence" in done.stderr
    assert "error:" in done.stderr


@pytest.mark.parametrize(("target", "message"), [
    ("nope", "Can't locate revision identified by 'nope'"),
    ("+1", "Relative revision +1 didn't produce 1 migrations"),
])
def test_a_revision_alembic_refuses_exits_2_and_changes_nothing(database_url: str, target: str,
                                                                message: str) -> None:
    ok("migrate", database_url=database_url)
    done = cli("downgrade", target, database_url=database_url)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == f"error: {message}"
    assert tables(database_url) == set(TABLES)


def test_without_database_url_it_exits_2_naming_the_variable() -> None:
    done = cli("current", database_url=None)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == "error: DATABASE_URL: required but not set"
