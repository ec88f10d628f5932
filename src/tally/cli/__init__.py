"""The `tally` command: the same services as the API, for operators on the host."""
