"""The Grafana dashboard (docs/grafana/oshepherd.json) is a valid dashboard JSON whose queries
name only metrics the code registers, and shows every one of them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from oshepherd.api.metrics import REGISTRY, FleetCollector, FleetSnapshot

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "oshepherd.json"
PANEL_TYPES = {"row", "stat", "timeseries", "table", "gauge", "bargauge"}
# The series names a metric family of each type exposes (Prometheus's text format).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed() -> set[str]:
    """Every oshepherd series name: this process's and the fleet's."""
    families = [*REGISTRY.collect(), *FleetCollector(FleetSnapshot()).collect()]
    return {
        family.name + suffix
        for family in families
        if family.name.startswith("oshepherd_")
        for suffix in SUFFIXES[family.type]
    }


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def queries(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_it_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["title"] and board["uid"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES
        assert panel["title"]
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys() and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")")


def test_it_uses_only_metrics_that_exist_and_shows_each() -> None:
    names = exposed()
    used = {n for expr in queries(dashboard()) for n in re.findall(r"\boshepherd_\w+", expr)}
    assert used <= names, f"not registered: {sorted(used - names)}"
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"


def test_the_issues_metrics_are_registered() -> None:
    assert {
        "oshepherd_requests_total",
        "oshepherd_ttft_seconds_bucket",
        "oshepherd_request_duration_seconds_bucket",
        "oshepherd_queue_wait_seconds_bucket",
        "oshepherd_in_flight",
        "oshepherd_redis_errors_total",
        "oshepherd_queue_depth",
        "oshepherd_workers",
        "oshepherd_worker_slots",
        "oshepherd_worker_slots_busy",
        "oshepherd_model_loaded",
        "oshepherd_tokens_total",
        "oshepherd_generation_tokens_per_second",
    } <= exposed()
