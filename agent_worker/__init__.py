"""Agent workers: take runs from the run queue (`runs.queue`), run the agent's LangGraph graph over
its model and tools, and stream coalesced tokens; the run lifecycle itself is `runs.Runs`'s."""
