"""Application services: the use cases, above the event rules (events/) and the store.

Layers, bottom up: `events/` (the event's model, validation, cursor and log records; it
imports nothing of Tally's above it), then `store/`, `crypto/`, `auth/`, `registry/` (each
with its records), then `services/` (ingest, export), then `api/` and `cli/`.
"""
