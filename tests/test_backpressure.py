"""Backpressure a person can see, through a real node: places in the queue, then `overloaded`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from chorus_client.testing import ClientError
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import ClusterConfig, LocalCluster
from protocol import ErrorCode, Event
from tests.support import unique


@pytest.fixture(scope="module")
def no_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Runs queue and nobody takes them: the queue only grows."""
    config = ClusterConfig(nodes=1, workers=0, nginx=False, env={"RUN_QUEUE_MAX_DEPTH": "3"})
    with LocalCluster(tmp_path_factory.mktemp("no-workers"), config) as cluster:
        yield cluster


async def test_queued_runs_are_told_their_place_and_a_full_queue_refuses_new_sends(
    no_workers: LocalCluster,
) -> None:
    device = ChorusClient(no_workers.ws_url, no_workers.token(unique("alice")), device="phone")
    await device.connect()
    try:
        acks = [await device.send(f"question {n}", id=f"send-{n}") for n in range(3)]

        def places(run: str) -> list[object]:
            return [e["data"] for e in device.events if e["run"] == run and e["event"] == Event.RUN_QUEUED]

        await device.wait_for(lambda: bool(places(acks[2]["run"])), 10)
        # The first found an empty queue (nothing to say); the others their place behind it.
        assert [places(ack["run"]) for ack in acks] == [
            [], [{"behind": None, "position": 2}], [{"behind": None, "position": 3}],
        ]

        with pytest.raises(ClientError) as refused:
            await device.send("one too many")
        assert refused.value.code == ErrorCode.OVERLOADED
        assert refused.value.frame["retry_after_ms"] > 0
        assert "3 runs are waiting" in refused.value.frame["message"]

        again = await device.send("question 0", id="send-0")  # a retry of a stored send passes
        assert again["run"] == acks[0]["run"]
    finally:
        await device.close()
