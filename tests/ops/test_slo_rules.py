"""The SLO's alerting rules and dashboard (ops/): checked and unit-tested by promtool, made
only of metrics Tally exposes, and evaluated by a real Prometheus scraping a real server."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tally.metrics import PrometheusMetrics
from tests.api.helpers import auth
from tests.conftest import event, required_program
from tests.support.server import Server, free_port, running_server, stop

OPS = Path(__file__).resolve().parents[2] / "ops"
RULES = OPS / "prometheus" / "tally-rules.yml"
RULE_TESTS = OPS / "prometheus" / "tally-rules.test.yml"
DASHBOARD = OPS / "grafana" / "tally.json"


def tool(name: str) -> str:
    """The path of a Prometheus program (Debian's prometheus package)."""
    return required_program(name, package="prometheus")


def test_the_rules_pass_promtool_check() -> None:
    checked = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_rules_pass_their_unit_tests() -> None:
    # The tests make each alert fire on an outage and on slow answers, and stay quiet when
    # healthy and on a short blip (ops/prometheus/tally-rules.test.yml).
    tested = subprocess.run(
        [tool("promtool"), "test", "rules", RULE_TESTS.name],
        check=False,
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


# --- Only metrics Tally exposes ---------------------------------------------------------

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expression: str) -> set[str]:
    """The metric (and recorded rule) names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = _GROUPING.sub("", text)
    names: set[str] = set()
    for found in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[found.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if found.group().lower() not in _KEYWORDS:
            names.add(found.group())
    return names


def test_metric_names_are_read_from_expressions() -> None:
    expression = (
        'sum by (route) (rate(tally_a_total{route="/x",le="1.0"}[5m])) / ignoring(le) '
        "tally:b:rate5m > (14.4 * 0.001) and time() - max(c_seconds offset 5m) > bool 1"
    )
    assert metric_names(expression) == {"tally_a_total", "tally:b:rate5m", "c_seconds"}


def exposed() -> set[str]:
    """The sample names of every metric Tally exposes."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    registry = PrometheusMetrics(store="sqlite").registry
    assert registry is not None
    return {
        family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]
    }


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_rules_use_only_metrics_tally_exposes() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set().union(*(metric_names(rule["expr"]) for rule in rules()))

    assert used - exposed() - recorded == set()
    assert "tally_http_request_duration_seconds_bucket" in used
    assert {rule["alert"] for rule in rules() if "alert" in rule} >= {
        "TallyIngestSLOPage",
        "TallyIngestSLOTicket",
        "TallyExportSLOPage",
        "TallyExportSLOTicket",
    }


def test_the_dashboard_is_json_using_only_metrics_tally_exposes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set().union(*(metric_names(expression) for expression in expressions))

    assert len(expressions) >= 15
    assert used - exposed() - recorded == set()
    # Every panel's query is one the dashboard can show: its recorded rules exist.
    assert {name for name in used if ":" in name} <= recorded


# --- Evaluated for real -----------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(f"sqlite:///{tmp_path / 'tally.db'}", tmp_path) as running:
        yield running


def _keys(server: Server) -> tuple[str, str]:
    """A writer's key and a reader's."""
    with server.client(headers={"Authorization": f"Bearer {server.admin_key}"}) as admin:
        assert admin.post("/v1/tenants", json={"id": "acme"}).status_code == 201
        assert admin.post("/v1/applications", json={"id": "vm"}).status_code == 201
        made = [
            admin.post("/v1/keys", json=spec)
            for spec in (
                {"scopes": ["events:write"], "application": "vm"},
                {"scopes": ["events:read"]},
            )
        ]
        assert all(answer.status_code == 201 for answer in made), [a.text for a in made]
        return made[0].json()["key"], made[1].json()["key"]


def test_a_real_prometheus_computes_the_objectives_from_a_real_server(
    server: Server, tmp_path: Path
) -> None:
    prometheus = tool("prometheus")
    writer, reader = _keys(server)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "tally",
                        "authorization": {"credentials": server.admin_key},
                        "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )

    def query(expression: str) -> float | None:
        try:
            answer = httpx.get(
                f"http://127.0.0.1:{port}/api/v1/query", params={"query": expression}
            )
        except httpx.TransportError:
            return None  # not listening yet
        if answer.status_code != 200:
            return None  # listening, but its storage not ready yet: 503 in plain text
        result = answer.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    try:
        sli = "1 - tally:ingest_error_ratio:rate5m"
        found: dict[str, float | None] = {}
        deadline = time.monotonic() + 20
        n = 0
        with server.client() as client:
            while time.monotonic() < deadline:
                n += 1  # traffic all along, so that every rate has two samples that differ
                sent = client.post("/v1/events", json=event(f"evt-prom-{n}"), headers=auth(writer))
                assert sent.status_code == 200
                assert client.get("/v1/events/vm/evt-prom-1", headers=auth(reader)).is_success
                found = {
                    expression: query(expression)
                    for expression in (
                        sli,
                        "tally:ingest_good_requests:rate5m",
                        "tally:export_good_requests:rate5m",
                        'sum(rate(tally_events_total{outcome="accepted"}[1m]))',
                    )
                }
                if all(v is not None and v > 0 for v in found.values()):  # NaN > 0 is false
                    break
                time.sleep(0.2)
    finally:
        stop(process)

    logs = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
    assert all(v is not None and v > 0 for v in found.values()), (found, logs)
    assert found[sli] == 1.0  # every request answered, within 1 s
