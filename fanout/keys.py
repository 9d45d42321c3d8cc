"""The Redis keys and channels of users' streams.

Per-user keys share the hash tag ``{u:<user>}`` so the publish script's keys live in one slot
(Redis Cluster would require it; single Redis does not care). The rest of Chorus's keys extend
this class in `common.keys`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamKeys:
    """Key builder; `prefix` isolates deployments (and tests) sharing one Redis."""

    prefix: str = "chorus"

    def user_prefix(self, user: str) -> str:
        """What every key of `user`'s starts with. The publish script (`fanout/publish.lua`) is
        given only this and builds the stream's keys and channel from it with the suffixes below."""
        return f"{self.prefix}:{{u:{user}}}:"

    def user_key(self, user: str, suffix: str) -> str:
        """A key in `user`'s hash slot."""
        return self.user_prefix(user) + suffix

    def meta(self, user: str) -> str:
        """Hash: ``epoch`` (changes when history is lost) and ``seq`` (the user's last seq)."""
        return self.user_key(user, "meta")

    def history(self, user: str) -> str:
        """Capped stream of the user's frames; entry id ``<seq>-0``, field ``f`` = the frame."""
        return self.user_key(user, "history")

    def producers(self, user: str) -> str:
        """Hash producer -> ``"<pseq>:<seq>"``: the last publish of each producer (dedupes retries)."""
        return self.user_key(user, "producers")

    def fences(self, user: str) -> str:
        """Hash fence tag -> ms timestamp: tags whose later publishes are refused."""
        return self.user_key(user, "fences")

    def channel(self, user: str) -> str:
        """Pub/Sub channel carrying the user's frames."""
        return self.user_key(user, "ch")

    def canary(self, hub: str) -> str:
        """Pub/Sub channel a node's hub publishes to itself, to notice a deaf subscription."""
        return f"{self.prefix}:canary:{hub}"
