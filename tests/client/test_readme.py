"""The README's "Client SDK" example, run as written (twice) against a real `tally serve`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.client.conftest import Deployment
from tests.support.readme import readme_block


def sdk_example() -> str:
    return readme_block("## Client SDK", "python")


def test_the_sdk_example_reports_hands_back_and_resumes(
    deployment: Deployment, tmp_path: Path
) -> None:
    script = tmp_path / "example.py"
    script.write_text(sdk_example(), encoding="utf-8")
    env = os.environ | {
        "TALLY": deployment.server.base_url,
        "WRITE": deployment.writer,
        "READ": deployment.reader,
    }
    runs = [
        subprocess.run(
            [sys.executable, str(script)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for _ in range(2)
    ]
    for output in runs:
        assert "1 acknowledged, 1 handed back" in output, output
        assert re.search(
            r"^not stored: [0-9a-f]{32} Tally rejected the event\. .*/quantity", output, re.M
        )
    first = re.findall(r"^exported (\S+) 0\.1$", runs[0], re.M)
    second = re.findall(r"^exported (\S+) 0\.1$", runs[1], re.M)
    # The second run resumes from the saved cursor: it exports only its own new event.
    assert len(first) == 1
    assert len(second) == 1
    assert first != second
