"""Django Channels peer: an ``AsyncWebsocketConsumer`` over ``channels_redis``'s RedisChannelLayer.

    CHORUS_PEER_REDIS=URL CHORUS_PEER_SECRET=S <peers venv>/bin/python -m uvicorn \
        loadtest.peers.channels_app:application --port P --loop uvloop --ws websockets

A device opens ``ws://host:port/ws?user=U&token=T`` (``tokens.py``); the consumer joins group
``U`` (``group_add``) and accepts. The publisher (``publisher.py --system channels``) calls
``group_send(U, {"type": "ev", "text": payload})`` on the same channel layer; each member's
consumer gets it through its process's channel and sends the text. The core layer (not the
experimental Pub/Sub one) is the layer Channels' documentation recommends for production; its
``capacity`` is raised from 100 to 10,000, since at the default a process that falls behind loses
events (``group_send`` drops on a full channel without a word).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="bench",
    ALLOWED_HOSTS=["*"],
    INSTALLED_APPS=["channels"],
    CHANNEL_LAYERS={"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                "CONFIG": {"hosts": [os.environ.get("CHORUS_PEER_REDIS",
                                                                    "redis://127.0.0.1:6379/0")],
                                           # All of a process's consumers share one Redis list; at the
                                           # default capacity of 100 group_send silently drops the rest.
                                           "capacity": 10_000}}},
)
django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from loadtest.peers.tokens import valid  # noqa: E402

SECRET = os.environ.get("CHORUS_PEER_SECRET", "")


class Device(AsyncWebsocketConsumer):  # type: ignore[misc]
    group = ""

    async def connect(self) -> None:
        query = parse_qs(self.scope["query_string"].decode())
        user, token = query.get("user", [""])[0], query.get("token", [""])[0]
        if not valid(SECRET, user, token):
            await self.close(code=4001)
            return
        self.group = user
        await self.channel_layer.group_add(user, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def ev(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])


application = ProtocolTypeRouter({"websocket": URLRouter([path("ws", Device.as_asgi())])})
