from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from router.accounting.ledger import CallLedger, Ledger, LedgerError, LedgerRow
from router.accounting.ledger_pg import PgLedger
from router.accounting.pg import PgTarget

# 2024-03-10 12:00:00 UTC and the days around it.
NOON = 1710072000.0
DAY = 86400.0


def row(
    request_id: str = "r1",
    *,
    ts: float = NOON,
    caller: str = "app",
    route: str = "hosted",
    cost: float = 0.01,
    equiv: float = 0.01,
    status: int = 200,
    alias: str = "demo",
) -> LedgerRow:
    return LedgerRow(
        ts=ts,
        request_id=request_id,
        caller=caller,
        alias=alias,
        route=route,
        backend="mistral" if route == "hosted" else "demo-local",
        model_id="mistral-small",
        prompt_tokens=10,
        completion_tokens=5,
        cost_usd=cost,
        hosted_equiv_usd=equiv,
        latency_s=0.5,
        ttft_s=0.1 if route else None,
        status=status,
        reason="local-ok",
        endpoint="chat",
    )


class Store:
    """One place for the ledger's rows: a SQLite file or a PostgreSQL database."""

    def __init__(self, kind: str, path: Path, pg_url: str | None) -> None:
        self.kind = kind
        self.path = path
        self.pg_url = pg_url

    def open(self) -> CallLedger:
        if self.pg_url is not None:
            return PgLedger(PgTarget.from_url(self.pg_url, "TEST_DATABASE_URL"))
        return Ledger(self.path)

    def count(self, request_id: str | None = None) -> int:
        """Rows another process would see: a fresh connection, no shared state."""
        sql = "SELECT COUNT(*) FROM calls"
        if self.pg_url is not None:
            with psycopg.connect(self.pg_url, connect_timeout=5) as pg:
                if request_id is None:
                    got = pg.execute(sql).fetchone()
                else:
                    got = pg.execute(sql + " WHERE request_id = %s", (request_id,)).fetchone()
                assert got is not None
                return int(got[0])
        conn = sqlite3.connect(self.path)
        try:
            if request_id is None:
                return int(conn.execute(sql).fetchone()[0])
            return int(conn.execute(sql + " WHERE request_id = ?", (request_id,)).fetchone()[0])
        finally:
            conn.close()


# PostgreSQL runs these same tests in tests/integration/test_ledger_pg.py.
@pytest.fixture(params=["sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path / "sub" / "ledger.db", None)


@pytest.fixture
async def ledger(store: Store) -> AsyncIterator[Any]:
    led = store.open()
    await led.start()
    yield led
    await led.stop()


async def test_record_and_read_back(ledger: CallLedger, store: Store) -> None:
    written = row("a", route="", cost=0.0, equiv=0.0, status=429)
    await ledger.record(written)
    assert ledger.rows(since=0, until=NOON + 1) == [written]
    assert written.ttft_s is None  # NULL round-trips as None
    assert store.count() == 1


async def test_sqlite_ledger_is_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    async with Ledger(db) as led:
        await led.record(row())
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_memory_ledger_reads_what_it_writes() -> None:
    async with Ledger(":memory:") as led:
        await led.record(row("m"))
        assert [r.request_id for r in led.rows(since=0, until=NOON + 1)] == ["m"]
        assert led.spend(since=0) == pytest.approx(0.01)


async def test_concurrent_records_are_committed_when_await_returns(
    ledger: CallLedger, store: Store
) -> None:
    async def one(i: int) -> None:
        await ledger.record(row(f"r{i}", ts=NOON + i))
        # Committed means visible to a new connection the moment the await returns.
        assert store.count(f"r{i}") == 1

    await asyncio.gather(*(one(i) for i in range(200)))
    assert store.count() == 200
    got = ledger.rows(since=NOON, until=NOON + 200, limit=500)
    assert [r.request_id for r in got] == [f"r{i}" for i in range(200)]


async def test_stop_flushes_rows_queued_without_waiting(store: Store) -> None:
    led = store.open()
    await led.start()
    for i in range(50):
        led.record_nowait(row(f"n{i}"))
    await led.stop()
    assert store.count() == 50
    with pytest.raises(LedgerError):
        led.record_nowait(row("late"))


async def test_record_needs_a_started_ledger(store: Store) -> None:
    led = store.open()
    try:
        with pytest.raises(LedgerError):
            await led.record(row())
    finally:
        led.close()


async def test_reopening_keeps_rows(store: Store) -> None:
    first = store.open()
    await first.start()
    await first.record(row("kept", cost=0.5))
    await first.stop()
    second = store.open()
    try:
        assert [r.request_id for r in second.rows(since=0, until=NOON + 1)] == ["kept"]
        assert second.spend(since=0) == pytest.approx(0.5)
    finally:
        second.close()


async def test_spend_since_by_route_and_caller(ledger: Any) -> None:
    for r in (
        row("old", ts=NOON - DAY, cost=1.0),
        row("a", caller="a", cost=0.25),
        row("b", caller="b", cost=0.5),
        row("local", caller="a", route="local", cost=0.125),
    ):
        await ledger.record(r)
    assert ledger.spend(since=NOON) == pytest.approx(0.75)
    assert ledger.spend(since=NOON - DAY) == pytest.approx(1.75)
    assert ledger.spend(since=NOON, caller="a") == pytest.approx(0.25)
    assert ledger.spend(since=NOON, caller="a", route="local") == pytest.approx(0.125)
    assert ledger.spend(since=NOON, caller="nobody") == 0.0
    assert ledger.spend_by_caller(since=NOON) == pytest.approx({"a": 0.25, "b": 0.5})
    # Reads run in worker threads (the usage API does) while the loop goes on.
    assert await asyncio.to_thread(ledger.spend, since=NOON) == pytest.approx(0.75)


async def test_usage_groups_sums_and_savings(ledger: Any) -> None:
    for r in (
        row("1", caller="a", route="local", cost=0.0, equiv=0.3),
        row("2", caller="a", route="local", cost=0.1, equiv=0.3, ts=NOON + 60),
        row("3", caller="a", route="hosted", cost=0.2, equiv=0.2, status=502),
        row("4", caller="b", route="hosted", cost=0.4, equiv=0.4, ts=NOON + DAY),
        row("5", caller="b", route="hosted", cost=9.0, ts=NOON + 3 * DAY),  # outside
    ):
        await ledger.record(r)
    groups = ledger.usage(since=NOON, until=NOON + 2 * DAY, group_by=["caller", "day", "route"])
    assert [(g["caller"], g["day"], g["route"]) for g in groups] == [
        ("a", "2024-03-10", "hosted"),
        ("a", "2024-03-10", "local"),
        ("b", "2024-03-11", "hosted"),
    ]
    local = groups[1]
    assert local["requests"] == 2
    assert local["prompt_tokens"] == 20 and local["completion_tokens"] == 10
    assert local["cost_usd"] == pytest.approx(0.1)
    assert local["hosted_equiv_usd"] == pytest.approx(0.6)
    assert local["saving_usd"] == pytest.approx(0.5)
    assert local["errors"] == 0
    assert groups[0]["errors"] == 1 and groups[0]["saving_usd"] == pytest.approx(0.0)

    by_caller = await asyncio.to_thread(ledger.usage, since=NOON, until=NOON + 2 * DAY,
                                        group_by=["caller"])
    assert [(g["caller"], g["requests"]) for g in by_caller] == [("a", 3), ("b", 1)]
    total = ledger.usage(since=NOON, until=NOON + 2 * DAY, group_by=[])
    assert len(total) == 1 and total[0]["requests"] == 4
    assert set(total[0]) == {
        "requests", "prompt_tokens", "completion_tokens", "cost_usd",
        "hosted_equiv_usd", "saving_usd", "errors",
    }
    assert ledger.usage(since=0, until=1, group_by=[]) == []


async def test_usage_and_rows_filter_by_caller(ledger: Any) -> None:
    await ledger.record(row("a1", caller="a", alias="x"))
    await ledger.record(row("a2", caller="a", alias="y", ts=NOON + 1))
    await ledger.record(row("b1", caller="b", alias="x"))
    groups = ledger.usage(since=0, until=NOON + 10, group_by=["alias", "backend"], caller="a")
    assert [(g["alias"], g["backend"], g["requests"]) for g in groups] == [
        ("x", "mistral", 1),
        ("y", "mistral", 1),
    ]
    rows = await asyncio.to_thread(ledger.rows, since=0, until=NOON + 10, caller="a")
    assert [r.request_id for r in rows] == ["a1", "a2"]
    assert [r.request_id for r in ledger.rows(since=0, until=NOON + 10, limit=1)] == ["a1"]
    # until is exclusive
    assert ledger.rows(since=0, until=NOON, caller="a") == []


@pytest.mark.parametrize("bad", [["model"], ["caller", "ts; DROP TABLE calls"], "caller"])
def test_invalid_group_by_raises(bad: list[str] | str, store: Store) -> None:
    led = store.open()
    try:
        with pytest.raises(ValueError):
            led.usage(since=0, until=1, group_by=bad)
    finally:
        led.close()


async def test_a_bad_row_does_not_fail_its_batch(ledger: CallLedger, store: Store) -> None:
    bad = row("bad")._replace(caller=object())
    results = await asyncio.gather(
        *(ledger.record(row(f"ok{i}")) for i in range(20)),
        ledger.record(bad),
        return_exceptions=True,
    )
    assert results[:20] == [None] * 20
    assert isinstance(results[20], LedgerError)
    assert store.count() == 20


def _rows_in_main_file(path: Path, tmp: Path) -> int:
    """Rows the database file holds on its own, without its WAL: what checkpoints folded in."""
    copy = tmp / "main-only.db"
    copy.write_bytes(path.read_bytes())
    conn = sqlite3.connect(copy)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
    except sqlite3.OperationalError:  # not even the schema folded in yet
        return 0
    finally:
        conn.close()


async def test_sqlite_commits_reach_the_wal_and_checkpoints_fold_them_in(
        tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger(path, checkpoint_s=0.05)
    await ledger.start()
    try:
        await asyncio.gather(*(ledger.record(row(f"r{i}")) for i in range(300)))
        # Committed, readable by another connection at once (in the WAL until folded in).
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 300
        conn.close()
        for _ in range(100):
            if _rows_in_main_file(path, tmp_path) == 300:
                break
            await asyncio.sleep(0.05)
        assert _rows_in_main_file(path, tmp_path) == 300  # the checkpointer ran
        ledger.record_nowait(row("last"))
    finally:
        await ledger.stop()
    assert _rows_in_main_file(path, tmp_path) == 301  # stop commits and folds in the rest
