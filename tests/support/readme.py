"""The README's code blocks, for the tests that run them as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(heading: str, language: str) -> str:
    """The first ```language block after the README heading `heading` (e.g. '## Reconciling')."""
    _, found_heading, after = README.read_text(encoding="utf-8").partition(f"\n{heading}\n")
    assert found_heading, f"README.md has no '{heading}' section"
    found = re.search(rf"^```{language}\n(.*?)^```", after, re.DOTALL | re.MULTILINE)
    assert found, f"no ```{language} block after '{heading}'"
    return found.group(1)
