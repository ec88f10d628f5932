"""Logical backups: one consistent snapshot of every table, encrypted and checked, restorable
into an empty store of either kind (service.py; docs/operations.md, "Backup and restore")."""
