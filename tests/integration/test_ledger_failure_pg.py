"""A PostgreSQL ledger whose database stops answering: a throwaway cluster of its own,
stopped mid-traffic and started again on the same data. The SQLite side of the same policy
is tests/unit/test_ledger_failure.py, whose helpers these tests share."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest

from router.accounting.ledger_spool import Spool, StoreHealth
from tests.pg import PgCluster
from tests.unit.helpers import ENV
from tests.unit.test_ledger import row
from tests.unit.test_ledger_failure import (
    Traffic,
    assert_no_tracebacks,
    ledger_state,
    make_config,
    serving,
    until,
    warnings_of,
)


@pytest.fixture
def own_cluster() -> Any:
    cluster = PgCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def pg_ids(url: str) -> list[str]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return [r[0] for r in conn.execute("SELECT request_id FROM calls").fetchall()]


async def test_postgres_stopped_mid_traffic_loses_no_row_and_refuses_hosted_with_503(
        own_cluster: PgCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    url = own_cluster.create_database()
    # A budget, so every hosted attempt reserves in the database first.
    cfg = make_config(tmp_path, budget=100.0, database_url_env="SPILLOVER_DB")
    async with serving(cfg, {**ENV, "SPILLOVER_DB": url}) as (app, client):
        traffic = Traffic(client)
        stop = asyncio.Event()

        async def local_traffic() -> None:
            while not stop.is_set():
                await traffic.many(4, concurrency=4)

        background = asyncio.create_task(local_traffic())
        assert (await traffic.one(hosted=True)).status_code == 200
        await until(lambda: len(traffic.answered) > 40)
        await asyncio.to_thread(own_cluster.pause)
        hosted = [await traffic.one(hosted=True) for _ in range(5)]
        for r in hosted:
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "budget_store_unavailable"
            assert "budget store" in err["message"] and "did not answer" in err["message"]
            assert int(r.headers["retry-after"]) > 0
        during = len(traffic.answered)
        await until(lambda: len(traffic.answered) > during + 40)
        state = await ledger_state(client)
        assert state["state"] == "failing" and state["spooled_rows"] > 0
        await asyncio.to_thread(own_cluster.resume)
        await until(lambda: not app.state.runtime.ledger.health.failing)
        after = len(traffic.answered)
        await until(lambda: len(traffic.answered) > after + 20)
        assert (await traffic.one(hosted=True)).status_code == 200
        stop.set()
        await background
        await until(lambda: app.state.runtime.ledger.health.pending == 0)
        assert app.state.runtime.ledger.health.rows_lost == 0
    local = [rid for rid, s in traffic.answered.items() if s == 200]
    assert len(local) > 100
    ids = pg_ids(url)
    assert len(ids) == len(set(ids))  # no duplicates
    assert set(ids) == set(traffic.answered)  # every answered call has its row
    assert warnings_of(caplog, "is failing") == 1
    assert warnings_of(caplog, "answers again") == 1
    budget_warnings = [r.getMessage() for r in caplog.records if r.name == "spillover.budgets"]
    assert sum("reservations fail" in m for m in budget_warnings) == 1
    assert sum("work again" in m for m in budget_warnings) == 1
    assert_no_tracebacks(caplog)


async def test_a_hosted_calls_spend_settled_during_a_postgres_outage_is_spooled_and_applied(
        own_cluster: PgCluster, tmp_path: Path) -> None:
    """A hold outcome is spend: it is spooled like a row and applied exactly once."""
    from router.accounting.budgets_pg import PgBudgetBook
    from router.accounting.ledger import StoreUnavailable
    from router.accounting.ledger_pg import PgLedger
    from router.accounting.pg import PgTarget
    from router.config import Budget

    url = own_cluster.create_database()
    health = StoreHealth("pg", spool=Spool(tmp_path / "spool", 1 << 20), retry_s=0.05)
    async with PgLedger(PgTarget.from_url(url, "TEST_DB"), health=health) as ledger:
        book = PgBudgetBook(Budget(daily_usd=1.0), {}, ledger, hold_ttl_s=300.0)
        book.load(ledger)
        held = await book.reserve("app", 0.3)
        assert held is not None
        await asyncio.to_thread(own_cluster.pause)
        with pytest.raises(StoreUnavailable, match="budget store"):
            await book.reserve("app", 0.1)
        book.settle(held, 0.25)
        await ledger.record(row("in-outage", caller="app"))  # returns: spooled, durable
        await ledger.flush()
        assert health.failing and health.pending == 1
        await asyncio.to_thread(own_cluster.resume)
        await until(lambda: not health.backlog and not health.failing)
        assert await book.reserve("app", 0.1) is not None
    with psycopg.connect(url, connect_timeout=5) as conn:
        spent = conn.execute("SELECT spent FROM budget_spend WHERE scope = 'global'"
                             " AND period = 'daily'").fetchone()
        left_holds = conn.execute("SELECT COUNT(*) FROM budget_holds"
                                  " WHERE amount_usd = 0.3").fetchone()
    assert spent is not None and spent[0] == pytest.approx(0.25)
    assert left_holds is not None and left_holds[0] == 0
    assert pg_ids(url) == ["in-outage"]
