"""A billing system's export consumer killed mid-stream while writers run: `tally export
--follow` (a real process, saving its cursor after each entry) is SIGKILLed at random moments
and restarted from its saved cursor. At the end what it collected is exactly what the store
holds, in log order: no gap, no repeat."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.client.conftest import ENV, exported_ids, register
from tests.support.faults import Count, Senders, kill
from tests.support.server import TALLY, running_server

KILLS = 3


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.postgres
@pytest.mark.timeout(90)
def test_an_export_consumer_killed_mid_stream_resumes_with_no_gap_and_no_repeat(
    fresh_postgres: str, tmp_path: Path
) -> None:
    rng = random.Random("export-consumer")
    out = tmp_path / "export.ndjson"
    with running_server(fresh_postgres, tmp_path, env=ENV) as server:
        writer, reader = register(server)
        command = [str(TALLY), "export", "--url", server.base_url, "--out", str(out)]
        command += ["--limit", "20"]
        env = {**os.environ, "TALLY_KEY": reader}
        kills = 0
        # About 100 events a second: within what `tally export`, which syncs its file and
        # cursor after every entry, writes here; so it is killed near the log's head.
        with Senders(server.base_url, writer, clients=2, pace=0.02) as senders:
            senders.wait_for(100)
            for _ in range(KILLS):
                consumer = subprocess.Popen(
                    [*command, "--follow", "--interval", "0.1"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                # Killed once it has written some more entries: at whatever byte it is then.
                wanted = lines(out) + rng.randint(10, 80)
                deadline = time.monotonic() + 30
                while lines(out) < wanted and consumer.poll() is None:
                    assert time.monotonic() < deadline, "the consumer made no progress"
                    time.sleep(0.005)
                assert consumer.poll() is None, consumer.communicate()[1].decode()
                kill(consumer)
                kills += 1
            ledger = senders.stop()
        # The writers are done: one last run (not following) catches up and ends.
        last = subprocess.run(command, env=env, capture_output=True, timeout=60, check=False)
        assert last.returncode == 0, last.stderr.decode()
        collected = [json.loads(line)["id"] for line in out.read_text().splitlines()]
        stored = exported_ids(server, reader)
    count = Count.of("export-consumer-killed", ledger, collected)
    count.assert_exactly_once()
    assert kills == KILLS
    assert collected == stored, "the consumer's copy differs from the store's log"
