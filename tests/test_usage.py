"""Token usage: counted by the model endpoint (`LLM_STREAM_USAGE`), stored on each run, shown in
`run.completed`, summed per user by `GET /v1/usage`."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import asyncpg
import pytest
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import ClusterConfig, LocalCluster
from tests.fake_llm import FakeLLM
from tests.support import rest, unique


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    """One node, one worker whose endpoint is asked for usage."""
    config = ClusterConfig(nodes=1, workers=1, nginx=False,
                           env={"LLM_BASE_URL": fake_llm.base_url, "LLM_STREAM_USAGE": "true"})
    with LocalCluster(tmp_path_factory.mktemp("usage"), config) as cluster:
        yield cluster


async def completed(cluster: LocalCluster, device: ChorusClient, text: str) -> dict[str, object]:
    ack = await device.send(text)
    end = await device.wait_run_end(ack["run"], 30)
    assert end["event"] == "run.completed"
    data: dict[str, object] = end["data"]
    return data | {"run": ack["run"]}


async def test_usage_is_shown_stored_and_summed(counted: LocalCluster, http: aiohttp.ClientSession) -> None:
    user = unique("alice")
    token = counted.token(user)
    base = f"http://127.0.0.1:{counted.node_ports[0]}"
    device = ChorusClient(f"ws://127.0.0.1:{counted.node_ports[0]}/ws", token, device="phone")
    await device.connect()
    db = await asyncpg.connect(counted.database_url)
    try:
        first = await completed(counted, device, "[[tokens:12]] count me")
        second = await completed(counted, device, "[[tokens:30]] and me")
        # The fake endpoint counts one prompt token and a token per word of the answer.
        assert first["usage"] == {"prompt_tokens": 1, "completion_tokens": 12}
        assert second["usage"] == {"prompt_tokens": 1, "completion_tokens": 30}
        stored = await db.fetchrow("SELECT prompt_tokens, completion_tokens FROM runs WHERE id = $1", first["run"])
        assert tuple(stored) == (1, 12)

        status, body = await rest(http, base, token, "GET", "/v1/usage")
        assert status == 200
        assert (body["runs"], body["prompt_tokens"], body["completion_tokens"]) == (2, 2, 42)
        status, body = await rest(http, base, token, "GET", "/v1/usage?since=2999-01-01T00:00:00Z")
        assert status == 200 and body["runs"] == 0 and body["completion_tokens"] == 0
        status, body = await rest(http, base, token, "GET", "/v1/usage?since=yesterday")
        assert status == 400 and body["error"]["code"] == "bad_request"
        # Only the user's own runs count.
        status, body = await rest(http, base, counted.token(unique("bob")), "GET", "/v1/usage")
        assert status == 200 and body["runs"] == 0
    finally:
        await db.close()
        await device.close()


async def test_without_usage_from_the_endpoint_nothing_is_shown(cluster: LocalCluster,
                                                                http: aiohttp.ClientSession) -> None:
    """The session cluster's endpoint is not asked for usage (LLM_STREAM_USAGE is off by default)."""
    token = cluster.token(unique("alice"))
    device = ChorusClient(cluster.ws_url, token, device="phone")
    await device.connect()
    try:
        data = await completed(cluster, device, "[[tokens:5]] no counting")
        assert "usage" not in data
        status, body = await rest(http, cluster.http_url, token, "GET", "/v1/usage")
        assert status == 200 and body["runs"] == 0 and body["prompt_tokens"] == 0
    finally:
        await device.close()
