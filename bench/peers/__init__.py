"""The reference points Tally is measured beside: `bare_asgi` (the ceiling of the server
stack) and `afternoon` (what a team writes in an afternoon). Both run on uvicorn with
`--loop uvloop --http httptools` and Tally's worker count (bench/servers.py starts them)."""
