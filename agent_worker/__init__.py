"""Agent workers: take runs from a Redis Streams consumer group, run the agent graph, stream tokens."""
