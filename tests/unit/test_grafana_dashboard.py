"""docs/grafana/spillover.json: a valid dashboard that queries only what /metrics exports.

Every metric name and label the dashboard's PromQL uses is checked against the samples that
router.metrics.Metrics really renders, so renaming a metric or a label breaks this test
instead of silently blanking a panel.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import Metrics
from router.routing.call import Call
from router.routing.policy import RequestFacts

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "spillover.json"
DS_REF = {"type": "prometheus", "uid": "${datasource}"}

_METRIC = re.compile(r"spillover_[a-z_]+")
_SELECTOR = re.compile(r"(spillover_[a-z_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_RANGE_FUNC = re.compile(r"\b(?:rate|irate|increase)\s*\(")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_LABEL_VALUES = re.compile(r"label_values\(\s*(spillover_[a-z_]+)\s*,\s*([a-zA-Z_]\w*)\s*\)")


# ---- what /metrics really exports ----------------------------------------------------------

def _exported() -> tuple[dict[str, set[str]], dict[str, str]]:
    """Sample name -> label names, and sample name -> family type, from a real render."""
    m = Metrics(["demo"])
    m.watch(
        lambda: {"e1": {"alias": "demo", "waiting": 1, "running": 1, "kv_cache": 0.1,
                        "inflight": 1, "saturated": False, "healthy": True,
                        "tokens_per_s": 5.0}},
        lambda: {"up": {"state": "closed"}},
        lambda: {"global": {"daily": {"limit": 1.0, "spent": 0.1, "reserved": 0.0,
                                      "left": 0.9}},
                 "callers": {}},
        lambda: {"local_share": 0.5},
        ledger=lambda: {"state": "ok", "failing_for_s": 0.0, "refusing": False,
                        "spooled_rows": 0, "spool_bytes": 0, "rows_spooled_total": 0,
                        "rows_lost_total": 0},
    )
    call = Call(request_id="r", facts=RequestFacts("demo", "chat"), started=time.monotonic(),
                deadline=time.monotonic() + 10)
    call.route, call.backend, call.reason, call.status = "local", "demo-local", "local-ok", 200
    call.prompt_tokens, call.completion_tokens = 3, 5
    call.cost_usd, call.hosted_equiv_usd, call.ttft_s = 0.001, 0.002, 0.1
    m.observe(call)
    # A tiered alias's call the cascade threw away: the tier families have samples too.
    call.tier, call.escalation, call.wasted = "demo", "none; score=0.100", "json-schema"
    m.observe(call)

    labels: dict[str, set[str]] = {}
    kinds: dict[str, str] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
            kinds[s.name] = family.type
    return labels, kinds


@pytest.fixture(scope="module")
def exported() -> tuple[dict[str, set[str]], dict[str, str]]:
    return _exported()


@pytest.fixture(scope="module")
def dash() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


# ---- walking the dashboard -----------------------------------------------------------------

def _panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])  # a collapsed row holds its panels


def _targets(d: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for p in _panels(d):
        for t in p.get("targets", []):
            yield p["title"], t


def _exprs(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(title, t["expr"]) for title, t in _targets(d)]


def _group(expr: str, open_at: int) -> str:
    """The text inside the parentheses that open at expr[open_at]."""
    depth = 0
    for i in range(open_at, len(expr)):
        if expr[i] == "(":
            depth += 1
        elif expr[i] == ")":
            depth -= 1
            if depth == 0:
                return expr[open_at + 1:i]
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def _group_before(expr: str, close_at: int) -> str:
    """The text inside the parentheses that close at expr[close_at]."""
    depth = 0
    for i in range(close_at, -1, -1):
        if expr[i] == ")":
            depth += 1
        elif expr[i] == "(":
            depth -= 1
            if depth == 0:
                return expr[i + 1:close_at]
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def _groupings(expr: str) -> Iterator[tuple[list[str], str]]:
    """(labels of a by/without clause, the aggregated argument), both forms of PromQL."""
    for m in _GROUPING.finditer(expr):
        names = [n.strip() for n in m.group(1).split(",") if n.strip()]
        rest = expr[m.end():].lstrip()
        if rest.startswith("("):  # sum by (x) (arg)
            yield names, _group(expr, len(expr) - len(rest))
        else:  # sum (arg) by (x)
            before = expr[:m.start()].rstrip()
            assert before.endswith(")"), f"cannot tell what {m.group(0)!r} groups in {expr!r}"
            yield names, _group_before(expr, len(before) - 1)


# ---- shape ---------------------------------------------------------------------------------

def test_dashboard_shape(dash: dict[str, Any]) -> None:
    assert dash["title"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    assert dash["schemaVersion"] == 39
    assert dash.get("id") is None  # importable: Grafana assigns the id
    panels = list(_panels(dash))
    assert panels
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p.get("title"), p
        assert p["type"] in {"row", "timeseries", "stat", "bargauge"}, p["type"]
        g = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(g), p["title"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] > 0 and g["h"] > 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} is wider than the grid"
        if p["type"] == "row":
            continue
        assert p["targets"], f"{p['title']} has no query"
        assert p["datasource"] == DS_REF, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), p["title"]
            assert t["datasource"] == DS_REF, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']} has no unit"


def test_panels_do_not_overlap(dash: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_datasource_is_an_input_and_a_variable(dash: dict[str, Any]) -> None:
    inputs = {i["name"]: i for i in dash["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == "${DS_PROMETHEUS}"
    # Only the variable names the imported datasource: panels follow the variable.
    text = DASHBOARD.read_text()
    assert text.count("${DS_PROMETHEUS}") == 2  # current.text and current.value


def test_alias_variable_filters_the_request_panels(
        dash: dict[str, Any], exported: tuple[dict[str, set[str]], dict[str, str]]) -> None:
    labels, _ = exported
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    alias = variables["alias"]
    assert alias["type"] == "query" and alias["datasource"] == DS_REF
    assert alias["includeAll"] and alias["multi"] and alias["allValue"] == ".*"
    found = _LABEL_VALUES.fullmatch(alias["definition"])
    assert found and found.group(0) == alias["query"]["query"]
    metric, label = found.groups()
    assert metric == "spillover_requests_total" and label in labels[metric]
    for title, expr in _exprs(dash):
        for name, body in _SELECTOR.findall(expr):
            if name in ("spillover_requests_total", "spillover_tokens_total"):
                assert 'alias=~"$alias"' in body, f"{title}: {expr}"
        if "spillover_requests_total" in expr:
            assert "{" in expr, f"{title} ignores $alias: {expr}"


# ---- metrics and labels against the real exposition ----------------------------------------

def test_every_metric_is_exported(
        dash: dict[str, Any], exported: tuple[dict[str, set[str]], dict[str, str]]) -> None:
    labels, _ = exported
    used = {name for _, expr in _exprs(dash) for name in _METRIC.findall(expr)}
    assert used
    missing = {
        f"{title}: {name}" for title, expr in _exprs(dash)
        for name in _METRIC.findall(expr) if name not in labels
    }
    assert not missing, f"not in /metrics: {sorted(missing)}; exported: {sorted(labels)}"


def test_the_dashboard_covers_every_metric_family(
        dash: dict[str, Any], exported: tuple[dict[str, set[str]], dict[str, str]]) -> None:
    labels, _ = exported
    used = {name for _, expr in _exprs(dash) for name in _METRIC.findall(expr)}
    families = {re.sub(r"_(total|created|bucket|count|sum)$", "", n) for n in labels}
    covered = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    assert families <= covered, f"no panel shows {sorted(families - covered)}"


def test_every_label_exists_on_its_metric(
        dash: dict[str, Any], exported: tuple[dict[str, set[str]], dict[str, str]]) -> None:
    labels, _ = exported
    problems: list[str] = []
    for title, t in _targets(dash):
        expr = t["expr"]
        metrics = set(_METRIC.findall(expr))
        for name, body in _SELECTOR.findall(expr):
            for label in _MATCHER.findall(body):
                if label not in labels.get(name, set()):
                    problems.append(f"{title}: {name} has no label {label!r}")
        for names, arg in _groupings(expr):
            inner = set(_METRIC.findall(arg))
            assert inner, f"{title}: grouping over no metric in {expr!r}"
            for name in inner:
                for label in names:
                    if label not in labels.get(name, set()):
                        problems.append(f"{title}: {name} has no label {label!r} to group by")
        for label in _LEGEND.findall(t.get("legendFormat", "")):
            if not any(label in labels.get(name, set()) for name in metrics):
                problems.append(f"{title}: legend uses {label!r}, absent from {sorted(metrics)}")
    assert not problems, "\n".join(problems)


def test_rate_and_quantiles_use_the_right_metric_types(
        dash: dict[str, Any], exported: tuple[dict[str, set[str]], dict[str, str]]) -> None:
    _, kinds = exported
    for title, expr in _exprs(dash):
        for m in _RANGE_FUNC.finditer(expr):
            for name in _METRIC.findall(_group(expr, m.end() - 1)):
                assert kinds[name] in {"counter", "histogram"}, f"{title}: rate of gauge {name}"
                assert name.endswith(("_total", "_bucket", "_count", "_sum")), f"{title}: {name}"
        if "histogram_quantile" in expr:
            assert re.search(r"by \([^)]*\ble\b", expr), f"{title}: quantile without le"
            assert all(n.endswith("_bucket") for n in _METRIC.findall(expr)), title


def test_the_brief_queries_are_there(dash: dict[str, Any]) -> None:
    exprs = [expr for _, expr in _exprs(dash)]
    joined = "\n".join(exprs)
    assert "sum by (reason) (rate(spillover_requests_total" in joined
    assert 'status=~"4..|5.."' in joined
    assert 'route="local"' in joined and 'route=~"local|hosted"' in joined
    assert "spillover_local_share" in joined
    for metric, quantiles in (("spillover_request_latency_seconds_bucket", ("0.5", "0.95", "0.99")),
                              ("spillover_time_to_first_token_seconds_bucket", ("0.5", "0.95"))):
        for q in quantiles:
            assert f"histogram_quantile({q}, sum by (le, route) (rate({metric}" in joined
    assert "sum by (route, kind) (rate(spillover_tokens_total" in joined
    assert "increase(spillover_cost_usd_total[1d])" in joined
    assert "sum by (caller) (increase(spillover_saving_usd_total[1d]))" in joined
    assert all("$__rate_interval" in e for e in exprs if "rate(" in e and "increase(" not in e)


def test_units_and_legends(dash: dict[str, Any]) -> None:
    units: dict[str, set[str]] = {}
    for p in _panels(dash):
        if p["type"] == "row":
            continue
        unit = p["fieldConfig"]["defaults"]["unit"]
        for t in p["targets"]:
            for name in _METRIC.findall(t["expr"]):
                units.setdefault(name, set()).add(unit)
            if "spillover_engine_" in t["expr"]:
                assert t["legendFormat"] == "{{engine}}", p["title"]
    assert units["spillover_request_latency_seconds_bucket"] == {"s"}
    assert units["spillover_time_to_first_token_seconds_bucket"] == {"s"}
    assert {"currencyUSD"} == units["spillover_cost_usd_total"] == units[
        "spillover_saving_usd_total"] == units["spillover_budget_left_usd"]
    assert "reqps" in units["spillover_requests_total"]
    assert "percentunit" in units["spillover_requests_total"]
    assert units["spillover_local_share"] == {"percentunit"}
    assert units["spillover_engine_kv_cache"] == {"percentunit"}


def test_breaker_state_is_mapped(dash: dict[str, Any]) -> None:
    (panel,) = [p for p in _panels(dash) if any(
        t["expr"] == "spillover_breaker_state" for t in p.get("targets", []))]
    mapped: dict[str, str] = {}
    for m in panel["fieldConfig"]["defaults"]["mappings"]:
        assert m["type"] == "value"
        mapped.update({k: v["text"] for k, v in m["options"].items()})
        assert all(v.get("color") for v in m["options"].values())
    assert mapped == {"0": "closed", "1": "half-open", "2": "open"}
