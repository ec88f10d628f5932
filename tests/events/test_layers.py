"""`tally.events` is the bottom layer: every other package may import it, it imports none of them.

Read from the source with `ast` (not by importing), so an import inside a function or under
TYPE_CHECKING counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tally

ABOVE = (
    "tally.store",
    "tally.services",
    "tally.api",
    "tally.auth",
    "tally.crypto",
    "tally.registry",
    "tally.cli",
    "tally.bootstrap",
)
PACKAGE = Path(tally.__file__).parent


def imported_modules(text: str, package: str) -> set[str]:
    """Every module the source `text` of a module of `package` imports, relative imports
    resolved against `package`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # `from tally import store` imports tally.store.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).parent.parts)


def reaches_above(module: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in ABOVE)


def test_events_imports_nothing_of_tally_above_it() -> None:
    sources = sorted((PACKAGE / "events").rglob("*.py"))
    assert len(sources) >= 4  # model, validation, cursor, log at least
    offending = {
        str(path.relative_to(PACKAGE)): sorted(
            module
            for module in imported_modules(path.read_text(), package_of(path))
            if reaches_above(module)
        )
        for path in sources
    }
    assert {path: modules for path, modules in offending.items() if modules} == {}


def test_the_walk_sees_every_form_of_import() -> None:
    # The check above passes for the right reason only if it would see each of these.
    text = (
        "import tally.store.sqlite\n"
        "from tally import services\n"
        "from ..api import app\n"
        "def f():\n    from tally.auth.records import KeyRecord\n"
    )
    found = {m for m in imported_modules(text, "tally.events") if reaches_above(m)}
    assert {"tally.store.sqlite", "tally.services", "tally.api", "tally.auth.records"} <= found
    assert not reaches_above("tally.storefront")
    assert not reaches_above("tally.events.model")
