"""Chorus through a real PgBouncer in transaction mode, in front of a real Postgres.

PgBouncer is the system's (Debian package ``pgbouncer``), started by each test on a free port with
an ini and userlist of its own. In transaction mode it lends a client a server connection for one
transaction only, and asyncpg's statement cache breaks in two ways, each made certain here rather
than left to load:

- The next transaction runs on another server connection, one without the statement: '...
  "__asyncpg_stmt_3__" does not exist'. Here another client holds the server connection the
  store used last inside a transaction, as another node's send would.
- A server connection keeps the statements a client prepared on it after the client is gone, and
  every process names its statements ``__asyncpg_stmt_1__``, ``__asyncpg_stmt_2__``, ...: a
  restarted node, or another process, that lands there fails with '... already exists'. Commands
  run one after another always land on the same server connection: the second one meets the first
  one's statements.

For the node and the worker PgBouncer resets every server connection after every transaction
(``server_reset_query_always``: DISCARD ALL), so any statement used in two transactions fails, and
what passes keeps no session state between transactions (statements, settings, locks).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import REPO_ROOT, PostgresServer, Proc, free_port
from persistence.migrate import upgrade_head
from persistence.records import Message
from persistence.store import Store
from tests.fake_llm import FakeLLM
from tests.support import node_ws, rest, unique

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer not installed (Debian package pgbouncer)")
PLAIN, RESET = "plain", "reset"
WAIT_S = 10.0


class PgBouncer:
    """PgBouncer in transaction mode on 127.0.0.1, passing every database of the Postgres on
    `postgres_port` through under its own name; with `reset_always`, each server connection is
    reset after every transaction."""

    def __init__(self, workdir: Path, postgres_port: int, *, reset_always: bool) -> None:
        assert PGBOUNCER is not None
        self.port = free_port()
        self.workdir = workdir
        self.postgres_port = postgres_port
        self.reset_always = reset_always
        self.proc = Proc("pgbouncer", [PGBOUNCER, str(workdir / "pgbouncer.ini")], workdir=workdir)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        userlist = self.workdir / "userlist.txt"
        # The test Postgres trusts user postgres; PgBouncer still wants the user in its auth_file.
        userlist.write_text('"postgres" ""\n')
        # PgBouncer refuses to run as root; started as root it reads these files, then becomes `user`.
        become = "user = nobody" if os.geteuid() == 0 else ""
        (self.workdir / "pgbouncer.ini").write_text(f"""\
[databases]
* = host=127.0.0.1 port={self.postgres_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
pool_mode = transaction
default_pool_size = 4
server_reset_query = DISCARD ALL
server_reset_query_always = {int(self.reset_always)}
auth_type = trust
auth_file = {userlist}
logfile =
pidfile =
{become}
""")
        self.proc.start()
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if not self.proc.alive or time.monotonic() > deadline:
                    self.proc.stop()
                    raise RuntimeError(f"pgbouncer did not start:\n{self.proc.log_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def database(postgres: PostgresServer) -> str:
    """A new, empty database of the test's own (its name; the URL is Postgres's or PgBouncer's)."""
    name = f"pgb_{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    return name


@pytest.fixture
def pgbouncer(request: pytest.FixtureRequest, postgres: PostgresServer, tmp_path: Path) -> Iterator[PgBouncer]:
    """PgBouncer's defaults, or with ``@pytest.mark.parametrize("pgbouncer", [RESET], indirect=True)``
    each server connection reset after every transaction."""
    bouncer = PgBouncer(tmp_path, postgres.port, reset_always=getattr(request, "param", PLAIN) == RESET)
    bouncer.start()
    yield bouncer
    bouncer.stop()


@pytest.fixture
async def bounced_url(postgres: PostgresServer, database: str, pgbouncer: PgBouncer) -> AsyncIterator[str]:
    """The test's database, migrated (directly), as reached through PgBouncer."""
    await asyncio.to_thread(upgrade_head, f"postgresql://postgres@127.0.0.1:{postgres.port}/{database}")
    yield pgbouncer.url(database)


async def turn(store: Store, user: str, number: int) -> list[Message]:
    """What a node and a worker ask of the store for one turn: create a conversation, accept a
    send (a transaction), number it, claim its run, store the answer (a transaction), read the
    conversation back."""
    conversation = await store.create_conversation(user, title=f"turn {number}", agent="default")
    send = await store.accept_send(user, client_id=f"send-{number}", conversation=conversation.id,
                                   text=f"question {number}", device="phone", agent="default")
    await store.set_message_seq(user, send.message, 10 + number)
    claim = await store.claim_run(send.run, worker="w1", lease_s=30)
    assert claim is not None and claim.message == send.message
    await store.finish_run(send.run, status="completed", text=f"answer {number}", worker="w1")
    return await store.list_messages(user, conversation.id, limit=10, before=None)


@asynccontextmanager
async def another_client_in_a_transaction(url: str) -> AsyncIterator[None]:
    """Another client inside a transaction: PgBouncer lends it the server connection given back
    last, the one the store's last transaction ran on, and the store's next ones run on another."""
    other = await asyncpg.connect(url, statement_cache_size=0, timeout=WAIT_S)
    try:
        async with other.transaction():
            yield
    finally:
        await other.close()


async def test_the_store_works_through_pgbouncer_with_the_statement_cache_off(bounced_url: str) -> None:
    store = await Store.connect(bounced_url, max_size=1, statement_cache_size=0)
    try:
        user = unique("alice")
        first = await turn(store, user, 0)
        async with another_client_in_a_transaction(bounced_url):
            second = await turn(store, user, 1)
    finally:
        await store.close()
    assert [(m.role, m.content, m.device, m.seq) for m in first + second] == [
        ("user", "question 0", "phone", 10), ("assistant", "answer 0", None, None),
        ("user", "question 1", "phone", 11), ("assistant", "answer 1", None, None),
    ]


async def test_with_the_statement_cache_on_the_same_work_fails_as_asyncpg_warns(bounced_url: str) -> None:
    store = await Store.connect(bounced_url, max_size=1, statement_cache_size=100)
    try:
        user = unique("alice")
        await turn(store, user, 0)
        async with another_client_in_a_transaction(bounced_url):
            with pytest.raises(asyncpg.InvalidSQLStatementNameError) as failed:
                await turn(store, user, 1)
    finally:
        await store.close()
    assert re.fullmatch(r'prepared statement "__asyncpg_stmt_[0-9a-f]+__" does not exist', failed.value.message)
    assert "set statement_cache_size to 0" in (failed.value.hint or "")  # asyncpg's advice for PgBouncer


def cli(*args: str, database_url: str) -> str:
    env = {**os.environ, "DATABASE_URL": database_url,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run([sys.executable, "-m", "persistence", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO_ROOT, check=False)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout.strip()


def test_migrations_run_through_pgbouncer(database: str, pgbouncer: PgBouncer) -> None:
    """Each command is a new client on the server connection the one before left its statements
    on: with statements cached, the second fails ('... already exists')."""
    url = pgbouncer.url(database)
    assert cli("migrate", database_url=url) == "migrations: at head"
    assert cli("current", database_url=url).endswith("(head)")
    assert cli("downgrade", "base", database_url=url).startswith("downgraded; current: base")
    assert cli("history", database_url=url).splitlines()[-1] == "base  no tables  (current)"
    assert cli("migrate", database_url=url) == "migrations: at head"
    assert cli("migrate", database_url=url) == "migrations: at head"
    assert cli("current", database_url=url).endswith("(head)")


@pytest.fixture
def bounced_cluster(database: str, pgbouncer: PgBouncer, fake_llm: FakeLLM,
                    tmp_path: Path) -> Iterator[LocalCluster]:
    """A node and a worker whose DATABASE_URL is PgBouncer's (the cluster migrates through it too)."""
    config = ClusterConfig(nodes=1, workers=1, nginx=False, database_url=pgbouncer.url(database),
                           env={"DATABASE_STATEMENT_CACHE_SIZE": "0", "LLM_BASE_URL": fake_llm.base_url,
                                "LLM_API_KEY": "test-key"})
    with LocalCluster(tmp_path / "cluster", config) as cluster:
        yield cluster


@pytest.mark.parametrize("pgbouncer", [RESET], indirect=True)
async def test_a_node_and_a_worker_serve_a_conversation_through_pgbouncer(
    bounced_cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    cluster = bounced_cluster
    user = unique("alice")
    token = cluster.token(user)
    status, created = await rest(http, cluster.http_url, token, "POST", "/v1/conversations",
                                 json={"title": "through pgbouncer"})
    assert status == 201, created
    phone = ChorusClient(node_ws(cluster, 0), token, device="phone")
    await phone.connect()
    try:
        answers = []
        for turn in range(2):
            ack = await phone.send(f"[[tokens:5]] question {turn}", conversation=created["id"])
            end = await phone.wait_run_end(ack["run"], 30)
            assert end["event"] == "run.completed", end
            answers.append(end["data"]["text"])
    finally:
        await phone.close()
    status, page = await rest(http, cluster.http_url, token, "GET", f"/v1/conversations/{created['id']}/messages")
    assert status == 200, page
    assert [(m["role"], m["content"]) for m in page["messages"]] == [
        ("user", "[[tokens:5]] question 0"), ("assistant", answers[0]),
        ("user", "[[tokens:5]] question 1"), ("assistant", answers[1]),
    ]
    for proc in (*cluster.nodes, *cluster.workers):
        assert "prepared statement" not in proc.log_text(), proc.name
