"""The broker seam: what the hub and publishers need from the store behind users' streams.

A broker keeps, per user, an ordered stream of opaque payloads: `publish` gives each the next
seq, keeps it in a capped history and fans it out over Pub/Sub, in one step. A payload is a
non-empty JSON object's text; the broker opens it with ``"seq":N`` (centrifuge frames its offset
and epoch around an opaque payload the same way), so the published frame is still one JSON
object whose first member is the seq (`fanout.recovery.frame_seq` reads it without parsing).

Two implementations: `fanout.redis_broker.RedisBroker` (one Lua script per publish) and
`fanout.memory_broker.MemoryBroker` (in-process, for fast tests). Errors:

    Fenced          publish refused: the payload's fence tag was fenced (a cancelled run)
    TRANSIENT       the broker is unreachable (common.redis_client.TRANSIENT); publishes
                    retry through it for `retry_for_s` with producer dedupe
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol


class Fenced(Exception):
    """The publish's fence tag was fenced: the stream refuses it (a cancelled run's events)."""


class Lost(Exception):
    """The stream no longer holds the publish this one follows: the broker lost writes it had
    acknowledged (Redis restarted from an older snapshot). Nothing was published."""


@dataclass(frozen=True)
class PublishResult:
    """`duplicate`: this producer's publish was already done (a retry); `seq` is the earlier one."""

    seq: int
    epoch: str
    duplicate: bool


@dataclass(frozen=True)
class Position:
    """Where a user's stream stands: `first_seq` is the oldest seq in history (0 = empty)."""

    epoch: str
    seq: int
    first_seq: int


class PubSub(Protocol):
    """One subscriber connection (redis-py's `PubSub` is one). Messages are dicts with `type`
    (``subscribe``, ``unsubscribe``, ``message``), `channel` and `data`."""

    def ping(self) -> Awaitable[Any]: ...
    def subscribe(self, *channels: str) -> Awaitable[Any]: ...
    def unsubscribe(self, *channels: str) -> Awaitable[Any]: ...
    def get_message(self, *, timeout: float | None = 0.0) -> Awaitable[dict[str, Any] | None]: ...
    def aclose(self) -> Awaitable[None]: ...


class Broker(Protocol):
    """Users' ordered streams, their history, fences, and the Pub/Sub that carries them."""

    async def publish(
        self, user: str, payload: str, *, producer: str = "", pseq: int = 0, fence: str | None = None,
        pass_fence: bool = False, producer_epoch: str = "", follows: tuple[str, int] | None = None,
    ) -> PublishResult:
        """Append `payload` to `user`'s stream and publish it. Give each publish a (`producer`,
        `pseq`), numbered 1, 2, 3... per producer, so a retry is never doubled, and a hole in
        them (the broker lost writes it had acknowledged) starts a new epoch, unless the epoch
        already differs from `producer_epoch` (the epoch of the producer's previous publish, if
        known). With `fence`, raise `Fenced` instead when that tag was fenced, unless `pass_fence`.
        With `follows` (another producer and its publish number), raise `Lost` instead when the
        stream no longer holds that producer's publish: the same loss, seen by a producer whose
        own numbering has no hole (its first publish)."""

    async def position(self, user: str) -> Position:
        """The user's epoch and latest seq (creating the epoch for a new history)."""

    async def read_after(self, user: str, after: int, *, upto: int) -> list[str] | None:
        """Frames with `after` < seq (at least through `upto`, the seq the caller knows exists),
        oldest first; None when history no longer reaches back to `after` (trimmed or lost)."""

    async def fence(self, user: str, tag: str) -> None:
        """From now on refuse every publish fenced by `tag`, but those that pass the fence."""

    async def is_fenced(self, user: str, tag: str) -> bool: ...

    def channel(self, user: str) -> str:
        """The Pub/Sub channel carrying `user`'s frames."""

    def canary_channels(self, hub: str) -> list[str]:
        """Channels of no user's, for a hub to publish to itself (a deaf subscription check): one
        per connection its subscriber holds (one per shard on a Redis Cluster), as of now."""

    def pubsub(self) -> PubSub:
        """A new subscriber connection."""

    async def signal(self, channel: str, data: str) -> None:
        """Publish `data` on `channel` outside any stream (the hub's canaries)."""
