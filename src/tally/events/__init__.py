"""The billing event: its model, validation, cursor and export-log records.

The bottom layer: every package of Tally may import it, and it imports nothing of Tally's but
`tally.errors` (tests/events/test_layers.py keeps it so). The services that ingest and export
events are in `tally.services`.
"""
