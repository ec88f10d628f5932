"""Storage: one `EventStore` interface (interface.py), SQLite and PostgreSQL behind it."""
