"""The ledger on PostgreSQL (a fresh database of the session's cluster): the store-generic
tests of tests/unit/test_ledger.py run again here against it, and what only PostgreSQL has."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from router.accounting.ledger_pg import PgLedger
from router.accounting.pg import PgTarget
from tests.unit import test_ledger as unit
from tests.unit.test_ledger import NOON, Store, row


@pytest.fixture(params=["postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Store:
    return Store(request.param, tmp_path / "sub" / "ledger.db", pg_url)


# The unit module's tests and its `ledger` fixture, collected here with the `store` above.
ledger = unit.ledger
test_record_and_read_back = unit.test_record_and_read_back
test_concurrent_records_are_committed_when_await_returns = (
    unit.test_concurrent_records_are_committed_when_await_returns)
test_stop_flushes_rows_queued_without_waiting = unit.test_stop_flushes_rows_queued_without_waiting
test_record_needs_a_started_ledger = unit.test_record_needs_a_started_ledger
test_reopening_keeps_rows = unit.test_reopening_keeps_rows
test_spend_since_by_route_and_caller = unit.test_spend_since_by_route_and_caller
test_usage_groups_sums_and_savings = unit.test_usage_groups_sums_and_savings
test_usage_and_rows_filter_by_caller = unit.test_usage_and_rows_filter_by_caller
test_invalid_group_by_raises = unit.test_invalid_group_by_raises
test_a_bad_row_does_not_fail_its_batch = unit.test_a_bad_row_does_not_fail_its_batch


async def test_two_pg_ledgers_share_rows_and_create_the_schema_once(pg_url: str) -> None:
    # Two replicas starting at once: both create the schema, neither fails.
    target = PgTarget.from_url(pg_url, "TEST_DATABASE_URL")
    a, b = await asyncio.gather(asyncio.to_thread(PgLedger, target),
                                asyncio.to_thread(PgLedger, target))
    async with a, b:
        await asyncio.gather(a.record(row("from-a")), b.record(row("from-b", ts=NOON + 1)))
        assert [r.request_id for r in a.rows(since=0, until=NOON + 2)] == ["from-a", "from-b"]
        assert b.spend(since=0) == pytest.approx(0.02)
