"""Tally: durable, exactly-once billing events."""
