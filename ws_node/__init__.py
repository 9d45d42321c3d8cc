"""Stateless WebSocket nodes: authenticate devices, deliver each user's ordered stream (`fanout`),
and translate commands into calls on the run lifecycle (`runs.Runs`); REST, limits, presence."""
