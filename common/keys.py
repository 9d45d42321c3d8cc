"""Every Redis key Chorus uses, built in one place: the streams' keys (`fanout.keys.StreamKeys`)
and those of presence, limits, the run queue and the agent registry."""

from __future__ import annotations

from dataclasses import dataclass

from fanout.keys import StreamKeys

RUNS_GROUP = "workers"


@dataclass(frozen=True)
class Keys(StreamKeys):
    """Key builder; `prefix` isolates deployments (and tests) sharing one Redis."""

    def presence(self, user: str) -> str:
        """Hash device -> ``"<node>|<expires_ms>"``: which devices are online, on which node."""
        return self.user_key(user, "presence")

    def command_bucket(self, user: str) -> str:
        """Hash ``m`` (thousandths of a token), ``t`` (ms): the user's command rate-limit bucket,
        shared by all nodes (ws_node/ratelimit.lua); expires once it would be full again."""
        return self.user_key(user, "rl:cmd")

    def rest_bucket(self, user: str) -> str:
        """Hash ``m``, ``t``: the user's REST rate-limit bucket (``/v1/…`` requests), the same
        script and shape as `command_bucket`."""
        return self.user_key(user, "rl:rest")

    def run_slots(self, user: str) -> str:
        """Hash ``run:<run id>`` / ``send:<client id>`` -> ms: the user's runs in flight, and sends
        being stored, counted against ``USER_MAX_RUNS_IN_FLIGHT`` (`runs.admission`)."""
        return self.user_key(user, "runs:slots")

    @property
    def agents(self) -> str:
        """Hash pool -> JSON entry: the agents (and versions) the workers serve (`runs.agents`)."""
        return f"{self.prefix}:agents"

    def runs(self, pool: str) -> str:
        """Stream of the run jobs of one agent pool (`runs.agents`), consumed by the consumer group
        of the workers serving it. The pools' streams share one hash tag: on a Redis Cluster they
        are in one slot, so a worker reads all of its pools in one XREADGROUP (runs cost a few
        commands each, not one per token: one shard carries them easily)."""
        return f"{self.prefix}:{{{self.prefix}:runs}}:pool:{pool}"

    @property
    def runs_dead(self) -> str:
        """Dead-letter stream for runs that failed too many deliveries."""
        return f"{self.prefix}:runs:dead"

    @property
    def nodes(self) -> str:
        """Hash node id -> JSON heartbeat record (sockets, users, ready, draining, started_at,
        updated_at, expires_at in ms) that each node rewrites every few seconds (ws_node.admin)."""
        return f"{self.prefix}:nodes"

    @property
    def workers(self) -> str:
        """Hash worker id -> JSON heartbeat record (agents, busy, concurrency, paused, draining,
        started_at, updated_at, expires_at in ms) that each worker rewrites every few seconds
        (agent_worker.heartbeat); read by the nodes' admin API."""
        return f"{self.prefix}:workers"
