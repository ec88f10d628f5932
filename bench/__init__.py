"""Tally's benchmark harness (issue 10): `make bench`, or `python -m bench --help`.

Modules: `run` (the command line and the order of things), `procs` (CPU and memory of a
server's process tree from /proc), `wrk` (the load generator and its Lua script), `servers`
(Tally, the afternoon peer and the bare ASGI app as processes), `limits` (the COPY limits),
`bigstore` (the 10-million-event store, loaded in-process), `scenarios` (what is measured),
`report` (the tables, the targets, JSON and Markdown). See bench/README.md.
"""
