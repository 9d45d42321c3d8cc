"""Chorus's peers in the S1/S2 benchmarks (``python -m loadtest.bench s1|s2``), outside the product.

Each peer is two server processes sharing one Redis, devices authenticating as a user (a token
from ``tokens.py``) and joining that user's room, group or channel, and a publisher using that
peer's own Redis path (``publisher.py``, ``node/publisher.js``). ``install.py`` sets up their
software on first use; the probes (``redispy_probe.py``, ``raw_probe.py``) need none beyond
Chorus's own interpreter. Modules here import nothing of Chorus: they also run in the peers venv.
"""
