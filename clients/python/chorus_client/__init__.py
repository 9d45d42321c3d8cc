"""chorus_client: the asyncio client of Chorus (docs/protocol.md), one device of one user.

    client = ChorusClient("wss://chat.example.com/ws", token=my_token_provider)
    await client.connect()
    ack = await client.send("What is the capital of France?")
    await client.wait_for(lambda: client.store.runs[ack.run].ended)

The public API is below; `chorus_client.testing` adds what tests of a server need (every frame and
event recorded). The wire vocabulary (events, statuses, codes) is the `protocol` package, shipped
with this one. Errors, drawn once, are in `chorus_client.errors`.
"""

from chorus_client.client import ChorusClient, Stats
from chorus_client.emitter import Subscription
from chorus_client.errors import ChorusError, ClientClosed, CommandTimeout, ConnectionLost
from chorus_client.events import (
    ClientEvent,
    Connected,
    ConnectionState,
    ConversationChanged,
    Disconnected,
    ErrorReported,
    EventReceived,
    FrameReceived,
    MessageChanged,
    MessagesChanged,
    Overflowed,
    PresenceChanged,
    Reloaded,
    Resynced,
    RunChanged,
    SeqGap,
    SnapshotApplied,
    StateChanged,
)
from chorus_client.gate import Position, SeqGate
from chorus_client.models import Conversation, InputRequest, Message, Run, RunError, ToolCall
from chorus_client.policy import Action, Backoff, Reconnects, close_action, handshake_action, retryable
from chorus_client.rest import RestClient
from chorus_client.store import Store
from chorus_client.tokens import TokenProvider, TokenReason

__all__ = [
    "Action",
    "Backoff",
    "ChorusClient",
    "ChorusError",
    "ClientClosed",
    "ClientEvent",
    "CommandTimeout",
    "Connected",
    "ConnectionLost",
    "ConnectionState",
    "Conversation",
    "ConversationChanged",
    "Disconnected",
    "ErrorReported",
    "EventReceived",
    "FrameReceived",
    "InputRequest",
    "Message",
    "MessageChanged",
    "MessagesChanged",
    "Overflowed",
    "Position",
    "PresenceChanged",
    "Reconnects",
    "Reloaded",
    "RestClient",
    "Resynced",
    "Run",
    "RunChanged",
    "RunError",
    "SeqGap",
    "SeqGate",
    "SnapshotApplied",
    "StateChanged",
    "Stats",
    "Store",
    "Subscription",
    "TokenProvider",
    "TokenReason",
    "ToolCall",
    "close_action",
    "handshake_action",
    "retryable",
]
