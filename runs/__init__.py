"""The run lifecycle: accepting a send under its double-texting policy, the run queue,
cancelling, ending a run and starting the next, the human-in-the-loop hand-off, snapshots and
the agent registry."""
