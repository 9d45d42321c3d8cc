"""Generic helpers every process shares: settings declared once and read from the environment
(`config`), process start-up (`process`), backoff, the Redis client and every Redis key."""
