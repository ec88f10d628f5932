"""/docs and /redoc render in a real browser with no network but the server's own.

Headless Chromium loads each page from a real `tally serve`, with every host name but the
server's made unresolvable, and the rendered DOM must list the operations of /openapi.json.
The pages must also name no asset on another host. Skipped only where no Chromium is
installed (`apt-get install chromium`), and never under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.support.server import Server

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI") == "true":
        pytest.fail("no Chromium on a CI machine: .ci/run installs it")
    pytest.skip("no Chromium installed (apt-get install chromium)")


def rendered(url: str, profile: Path) -> str:
    """The DOM of `url` after its scripts ran, in a browser that can reach 127.0.0.1 only."""
    command = [
        browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        # Every other host is unresolvable: a CDN the page still named would fail to load.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url") and value:
                self.urls.append(value)


def asset_urls(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    # The page's start-up script names the document and assets in strings, not attributes.
    return parser.urls + re.findall(r"""(?:url|Url)['"]?\s*[:=]\s*['"]([^'"]+)['"]""", html)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The pages do not depend on the store: SQLite only."""
    return f"sqlite:///{tmp_path / 'tally.db'}"


@pytest.fixture
def operations(tally_server: Server) -> list[tuple[str, str]]:
    document = httpx.get(f"{tally_server.base_url}/openapi.json").json()
    found = [
        (operation["operationId"], path)
        for path, methods in document["paths"].items()
        for operation in methods.values()
    ]
    assert len(found) >= 10
    return found


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_page_names_no_asset_on_another_host(tally_server: Server, page: str) -> None:
    answer = httpx.get(f"{tally_server.base_url}{page}")
    assert answer.status_code == 200

    urls = asset_urls(answer.text)

    assert urls, answer.text
    here = urlsplit(tally_server.base_url).netloc
    for url in urls:
        absolute = urljoin(f"{tally_server.base_url}{page}", url)
        assert urlsplit(absolute).netloc == here, url
        assert httpx.get(absolute).status_code == 200, url


def test_swagger_ui_renders_every_operation_offline(
    tally_server: Server, operations: list[tuple[str, str]], tmp_path: Path
) -> None:
    dom = rendered(f"{tally_server.base_url}/docs", tmp_path / "profile")

    assert 'class="swagger-ui' in dom
    for operation_id, path in operations:
        assert operation_id in dom, operation_id
        assert path in dom, path


def test_redoc_renders_every_operation_offline(
    tally_server: Server, operations: list[tuple[str, str]], tmp_path: Path
) -> None:
    dom = rendered(f"{tally_server.base_url}/redoc", tmp_path / "profile")

    for operation_id, path in operations:
        assert f"operation/{operation_id}" in dom, operation_id
        assert path in dom, path
