"""Agents with a LangGraph graph of their own (`"graph": "package.module:attribute"` in
AGENTS_JSON): tests/graphs.py's graphs streamed to devices like the built-in one."""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import pytest
from chorus_client.testing import RecordingClient as ChorusClient

from agent_worker.agents import agents_from_env
from common.config import SettingError
from loadtest.cluster import ClusterConfig, LocalCluster
from tests.fake_llm import FakeLLM
from tests.graphs import SIGNATURE
from tests.support import get_agents, unique

AGENTS = [{"name": "shouter", "graph": "tests.graphs:shouter"}, {"name": "writer", "graph": "tests.graphs:writer"}]


@pytest.fixture(scope="module")
def teams(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    config = ClusterConfig(nodes=1, workers=1, nginx=False,
                           env={"LLM_BASE_URL": fake_llm.base_url, "AGENTS_JSON": json.dumps(AGENTS)})
    with LocalCluster(tmp_path_factory.mktemp("teams"), config) as cluster:
        yield cluster


def token_text(device: ChorusClient, run: str) -> str:
    return "".join(e["data"]["text"] for e in device.events if e["run"] == run and e["event"] == "token")


async def test_an_own_graph_is_streamed_to_the_device(teams: LocalCluster, http: aiohttp.ClientSession) -> None:
    token = teams.token(unique("alice"))
    assert {a["name"] for a in await get_agents(http, teams, token)} == {"default", "shouter", "writer"}
    device = ChorusClient(f"ws://127.0.0.1:{teams.node_ports[0]}/ws", token, device="phone")
    await device.connect()
    try:
        # A StateGraph Chorus compiles; its node returns a whole message without a model.
        ack = await device.send("hello there", agent="shouter")
        end = await device.wait_run_end(ack["run"], 30)
        assert end["event"] == "run.completed" and end["data"]["text"] == "HELLO THERE"
        assert token_text(device, ack["run"]) == "HELLO THERE"

        # A factory's graph: one node streams the agent's model token by token, the next signs.
        ack = await device.send("[[tokens:10]] [[slow:0.02]] write", agent="writer")
        end = await device.wait_run_end(ack["run"], 30)
        words = " ".join(f"word{i}" for i in range(1, 11))
        assert end["event"] == "run.completed" and end["data"]["text"] == words + SIGNATURE
        assert token_text(device, ack["run"]) == words + SIGNATURE
        tokens = [e for e in device.events if e["run"] == ack["run"] and e["event"] == "token"]
        assert len(tokens) >= 3, "streamed, not one whole message"
        assert device.gaps == [] and device.duplicates == 0
    finally:
        await device.close()


@pytest.mark.parametrize(("graph", "error"), [
    ("tests.graphs", "package.module:attribute"),
    ("tests.no_such_module:graph", "No module named"),
    ("tests.graphs:nothing", "has no attribute"),
])
def test_a_graph_that_cannot_be_loaded_stops_the_worker_at_start(graph: str, error: str) -> None:
    with pytest.raises(SettingError, match=error) as raised:
        agents_from_env({"AGENTS_JSON": json.dumps([{"name": "mine", "graph": graph}])})
    assert "AGENTS_JSON" in str(raised.value)
