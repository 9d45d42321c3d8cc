"""A per-user ordered stream library: sequencing, history, Pub/Sub fan-out and recovery.

It knows nothing of what it carries. Every payload published for a user gets the next number of
that user's sequence in one Lua script that also appends the frame to the user's capped history
and publishes it, so concurrent publishers can neither reorder nor skip a seq. Nodes (`Hub`)
subscribe per user and deliver into bounded per-socket queues; a device resumes with one number
(`after`) and the history `epoch`.
"""
