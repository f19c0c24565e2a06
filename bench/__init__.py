"""Benchmarks: figures measured against targets on this machine, printed as a table and saved as JSON.

Run `python -m bench all` (or one scenario: `python -m bench ingest`). Not part of the test suite: speed
and memory targets live here, never in timed unit tests.
"""
