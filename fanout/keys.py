"""Every Redis key and channel Chorus uses, built in one place.

Per-user keys share the hash tag ``{u:<user>}`` so the publish script's keys live in one slot
(Redis Cluster would require it; single Redis does not care).
"""

from __future__ import annotations

from dataclasses import dataclass

RUNS_GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    """Key builder; `prefix` isolates deployments (and tests) sharing one Redis."""

    prefix: str = "chorus"

    def _user(self, user: str, suffix: str) -> str:
        return f"{self.prefix}:{{u:{user}}}:{suffix}"

    def meta(self, user: str) -> str:
        """Hash: ``epoch`` (changes when history is lost) and ``seq`` (the user's last seq)."""
        return self._user(user, "meta")

    def history(self, user: str) -> str:
        """Capped stream of the user's frames; entry id ``<seq>-0``, field ``f`` = the frame."""
        return self._user(user, "history")

    def producers(self, user: str) -> str:
        """Hash producer -> ``"<pseq>:<seq>"``: the last publish of each producer (dedupes retries)."""
        return self._user(user, "producers")

    def fences(self, user: str) -> str:
        """Hash run -> ms timestamp: runs that were cancelled; their later events are refused."""
        return self._user(user, "fences")

    def presence(self, user: str) -> str:
        """Hash device -> ``"<node>|<expires_ms>"``: which devices are online, on which node."""
        return self._user(user, "presence")

    def inflight(self, user: str) -> str:
        """Hash conversation -> run: the run in flight per conversation."""
        return self._user(user, "inflight")

    def command_bucket(self, user: str) -> str:
        """Hash ``m`` (thousandths of a token), ``t`` (ms): the user's command rate-limit bucket,
        shared by all nodes (fanout/ratelimit.lua); expires once it would be full again."""
        return self._user(user, "rl:cmd")

    def answers(self, user: str, run: str) -> str:
        """List: the user's answers to a run's questions (human in the loop), read by its worker."""
        return self._user(user, f"answers:{run}")

    def answered(self, user: str, run: str) -> str:
        """Hash request -> device: who answered each question of a run first."""
        return self._user(user, f"answered:{run}")

    def channel(self, user: str) -> str:
        """Pub/Sub channel carrying the user's frames."""
        return self._user(user, "ch")

    def canary(self, hub: str) -> str:
        """Pub/Sub channel a node's hub publishes to itself, to notice a deaf subscription."""
        return f"{self.prefix}:canary:{hub}"

    @property
    def agents(self) -> str:
        """String: JSON list of the agents the workers serve (for nodes: GET /v1/agents, checks)."""
        return f"{self.prefix}:agents"

    @property
    def runs(self) -> str:
        """Stream of run jobs consumed by the agent workers' consumer group."""
        return f"{self.prefix}:runs"

    @property
    def runs_dead(self) -> str:
        """Dead-letter stream for runs that failed too many deliveries."""
        return f"{self.prefix}:runs:dead"
