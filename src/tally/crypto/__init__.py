"""Encryption at rest: master keys in a keyring, per-tenant data keys, sealed attributes."""
