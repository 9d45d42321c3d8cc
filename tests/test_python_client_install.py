"""The client installs on its own: `pip install clients/python` into a fresh venv (no system site
packages, no server dependencies) brings `chorus_client`, the `protocol` package it ships and
aiohttp, and nothing of the server; a script run with that venv, outside the repository, chats
with a live cluster."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loadtest.cluster import LocalCluster
from loadtest.procs import REPO_ROOT
from tests.support import node_ws, unique

SERVER_ONLY = ("redis", "asyncpg", "langgraph", "langchain-core", "sqlalchemy", "alembic", "orjson", "uvloop")

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    import chorus_client, protocol
    from chorus_client import ChorusClient

    async def main(url, token):
        client = ChorusClient(url, lambda reason: token, device="fresh-venv")
        await client.connect()
        ack = await client.send("[[tokens:7]] from a fresh venv")
        await client.wait_for(lambda: ack.run in client.store.runs and client.store.runs[ack.run].ended, 30)
        print(client.store.runs[ack.run].status, client.store.runs[ack.run].text)
        print(chorus_client.__file__)
        print(protocol.__file__)
        await client.close()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def run(*args: str | Path, cwd: Path, timeout_s: float) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.timeout(600)
def test_the_client_installs_into_a_fresh_venv_and_chats_without_the_server(cluster: LocalCluster,
                                                                            tmp_path: Path) -> None:
    # The distribution as a checkout has it: clients/python, and protocol/ where package-dir points.
    source = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    shutil.copytree(REPO_ROOT / "clients" / "python", source / "clients" / "python", ignore=skip)
    shutil.copytree(REPO_ROOT / "protocol", source / "protocol", ignore=skip)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path, timeout_s=120)
    python = venv / "bin" / "python"
    # pip reads the machine's index configuration (offline here: a local index) for aiohttp.
    run(python, "-m", "pip", "install", "-q", source / "clients" / "python", cwd=tmp_path, timeout_s=400)

    installed = {line.split("==")[0].lower() for line in run(python, "-m", "pip", "freeze", cwd=tmp_path,
                                                             timeout_s=60).split()}
    assert {"chorus-client", "aiohttp"} <= installed
    assert not installed & set(SERVER_ONLY), installed & set(SERVER_ONLY)

    work = tmp_path / "elsewhere"  # not the repository: nothing of the server can be imported
    work.mkdir()
    (work / "chat.py").write_text(SCRIPT)
    user = unique("fresh")
    out = run(python, "chat.py", node_ws(cluster, 0), cluster.token(user), cwd=work, timeout_s=60).splitlines()
    assert out[0] == "completed " + " ".join(f"word{i}" for i in range(1, 8))
    assert all(line.startswith(str(venv)) for line in out[1:3]), out
