"""A ledger whose store fails: answered calls keep their rows (spooled, then written once
the store answers, without duplicates), or new calls are refused with 503, as configured.

The SQLite disk fills up by `PRAGMA max_page_count` set on the ledger's own write
connection: SQLite then fails writes with SQLITE_FULL ("database or disk is full"), the
same error a full filesystem gives, deterministically and without mounting anything.
PostgreSQL, stopped mid-traffic and started again on the same data, is in
tests/integration/test_ledger_failure_pg.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router.accounting.ledger import Ledger
from router.accounting.ledger_spool import Spool, StoreHealth
from router.config import Config, parse_config
from tests.unit.helpers import BASE_YAML, ENV, World, gateway_app, lifespan_client
from tests.unit.test_ledger import row

BODY = {"model": "demo", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def make_config(tmp_path: Path, *, budget: float | None = None, **server: Any) -> Config:
    data = yaml.safe_load(BASE_YAML)
    data["server"].update(ledger_path=str(tmp_path / "ledger.db"),
                          ledger_spool_dir=str(tmp_path / "spool"), ledger_retry_s=0.05,
                          **server)
    if budget is not None:
        data["budget"] = {"daily_usd": budget}
    return parse_config(yaml.safe_dump(data))


@contextlib.asynccontextmanager
async def serving(cfg: Config, env: dict[str, str] = ENV) -> AsyncIterator[
        tuple[Any, httpx.AsyncClient]]:
    app = gateway_app(World(), cfg, env)
    async with lifespan_client(app) as client:
        yield app, client


class Traffic:
    """Requests with ids of our own, so the ledger can be checked id by id."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.answered: dict[str, int] = {}
        self._n = 0

    async def one(self, *, hosted: bool = False) -> httpx.Response:
        self._n += 1
        rid = f"req-{self._n}"
        headers = {"x-request-id": rid}
        if hosted:
            headers["x-spillover-route"] = "hosted"
        resp = await self.client.post("/v1/chat/completions", json=BODY, headers=headers)
        self.answered[rid] = resp.status_code
        return resp

    async def many(self, n: int, concurrency: int = 10) -> list[httpx.Response]:
        out: list[httpx.Response] = []
        for start in range(0, n, concurrency):
            out += await asyncio.gather(*(self.one() for _ in range(min(concurrency,
                                                                         n - start))))
        return out


def sqlite_ids(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT request_id FROM calls")]
    finally:
        conn.close()


def fill_up(app: Any) -> None:
    """No page more for the ledger's writes: SQLITE_FULL, as on a full disk."""
    conn = app.state.runtime.ledger._write
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


def make_room(app: Any) -> None:
    app.state.runtime.ledger._write.execute("PRAGMA max_page_count = 1073741823")


async def until(check: Callable[[], Any], timeout_s: float = 15.0) -> None:
    """A generous bound to detect an outage, not a timing target."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def ledger_state(client: httpx.AsyncClient) -> dict[str, Any]:
    status = (await client.get("/status")).json()
    ledger = status["ledger"]
    assert isinstance(ledger, dict)
    return ledger


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records
               if r.name == "spillover.ledger" and r.levelno == logging.WARNING)


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


async def test_sqlite_full_disk_spools_every_answered_call_and_writes_it_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with serving(make_config(tmp_path)) as (app, client):
        traffic = Traffic(client)
        assert {r.status_code for r in await traffic.many(40)} == {200}
        fill_up(app)
        during = await traffic.many(300)
        assert {r.status_code for r in during} == {200}  # the default: keep serving
        state = await ledger_state(client)
        assert state["state"] == "failing" and state["policy"] == "spool"
        assert "full" in state["error"] and state["spooled_rows"] > 0
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ledger"]["state"] == "failing"
        metrics = (await client.get("/metrics")).text
        assert "spillover_ledger_store_up 0.0" in metrics
        assert "spillover_ledger_spooled_rows " in metrics
        make_room(app)
        await traffic.many(20)
        state = await ledger_state(client)
        for _ in range(300):
            if state["state"] == "ok" and state["spooled_rows"] == 0:
                break
            await asyncio.sleep(0.05)
            state = await ledger_state(client)
        assert (state["state"], state["spooled_rows"], state["rows_lost_total"]) == ("ok", 0, 0)
        assert "spillover_ledger_store_up 1.0" in (await client.get("/metrics")).text
    ids = sqlite_ids(tmp_path / "ledger.db")
    assert len(ids) == len(set(ids))  # no duplicates
    assert set(ids) == set(traffic.answered)  # every answered call has its row
    assert warnings_of(caplog, "is failing") == 1
    assert warnings_of(caplog, "answers again") == 1
    assert_no_tracebacks(caplog)
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


async def test_a_full_spool_refuses_new_calls_with_503_and_keeps_the_promise(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cfg = make_config(tmp_path, ledger_spool_max_bytes=4096)
    async with serving(cfg) as (app, client):
        traffic = Traffic(client)
        await traffic.many(20)
        fill_up(app)
        responses = [await traffic.one() for _ in range(60)]
        refused = [r for r in responses if r.status_code == 503]
        assert refused, "a full spool must refuse new calls"
        assert {r.status_code for r in responses} == {200, 503}
        for r in refused:
            err = r.json()["error"]
            assert err["code"] == "ledger_unavailable" and "spool" in err["message"]
            assert int(r.headers["retry-after"]) > 0
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ledger"]["refusing"] is True
        make_room(app)
        await until(lambda: not app.state.runtime.ledger.health.failing)
        assert (await traffic.one()).status_code == 200
        await until(lambda: app.state.runtime.ledger.health.pending == 0)
        assert app.state.runtime.ledger.health.rows_lost == 0
    ids = sqlite_ids(tmp_path / "ledger.db")
    assert len(ids) == len(set(ids))
    answered = {rid for rid, status in traffic.answered.items() if status == 200}
    assert answered <= set(ids)  # every call served has its row
    assert_no_tracebacks(caplog)


async def test_refuse_policy_answers_503_while_the_store_fails(tmp_path: Path) -> None:
    async with serving(make_config(tmp_path, ledger_failure="refuse")) as (app, client):
        traffic = Traffic(client)
        await traffic.many(20)
        fill_up(app)
        # The last pages fill first; from the first write that fails, every new call is
        # refused (the one whose row found the failure was served, and its row spooled).
        responses = [await traffic.one() for _ in range(120)]
        statuses = [r.status_code for r in responses]
        assert 503 in statuses
        first = statuses.index(503)
        assert set(statuses[first:]) == {503} and len(statuses) - first > 20
        refused = responses[first:]
        err = refused[-1].json()["error"]
        assert err["code"] == "ledger_unavailable"
        assert "ledger_failure: refuse" in err["message"]
        assert refused[-1].headers["retry-after"]
        assert (await client.get("/readyz")).status_code == 503
        make_room(app)
        await until(lambda: not app.state.runtime.ledger.health.failing)
        assert (await traffic.one()).status_code == 200
        await until(lambda: app.state.runtime.ledger.health.pending == 0)
    ids = sqlite_ids(tmp_path / "ledger.db")
    assert len(ids) == len(set(ids)) == len(traffic.answered)  # refusals are rows too


async def test_a_spooled_batch_already_in_the_store_is_not_written_twice(
        tmp_path: Path) -> None:
    """A replica that died after writing its spool to the store, before deleting it."""
    db = tmp_path / "ledger.db"
    async with Ledger(db) as led:
        await led.record(row("twice"))
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.append("b1", [["row", *row("twice")]])
    spool.append("b2", [["row", *row("once")]])
    spool.close()
    health = StoreHealth(str(db), spool=Spool(tmp_path / "spool", 1 << 20), retry_s=0.01)
    assert health.pending == 2
    async with Ledger(db, health=health):
        await until(lambda: health.pending == 0)
    assert sorted(sqlite_ids(db)) == ["once", "twice"]


def test_two_processes_cannot_share_a_spool(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool", 1 << 20)
    first.append("b1", [["row", *row("a")]])
    second = Spool(tmp_path / "spool", 1 << 20)
    with pytest.raises(OSError, match="in use by another process"):
        second.append("b2", [["row", *row("b")]])
    first.close()
    second.append("b2", [["row", *row("b")]])
    second.close()
