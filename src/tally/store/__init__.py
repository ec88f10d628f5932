"""Storage: narrow contracts (interface.py), every query written once (sql.py) over a dialect
(dialect.py), SQLite and PostgreSQL behind them (sqlite.py, postgres.py)."""
