"""The billing event: its model, its validation and its ingestion and export services."""
