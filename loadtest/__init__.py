"""Local clusters and load tools: real Redis, Postgres, nginx and Chorus processes on loopback."""
