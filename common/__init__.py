"""Generic helpers every process shares: settings from the environment, backoff, the Redis
client and its keys."""
