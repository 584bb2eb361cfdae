"""Tools beside the daemon, not part of it (like ``trio.testing``).

``trainguard.testing.simulator`` stands in for FAL on loopback (tests, benchmarks, ``trainguard
simulate``); ``trainguard.testing.demo`` runs the simulator and a real daemon under faults and prints a
table (``trainguard demo``). ``trainguard run`` imports neither.
"""
