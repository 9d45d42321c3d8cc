"""Stateless WebSocket nodes: authenticate devices, deliver each user's ordered stream, take commands."""
