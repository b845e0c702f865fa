"""Budgets shared by replicas through PostgreSQL: atomic reservations across processes'
connections, spend that survives a restart, holds of a dead replica that expire."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from router.accounting.budgets import MemoryBudgetBook, Reservation
from router.accounting.budgets_pg import PgBudgetBook
from router.accounting.ledger_pg import PgLedger
from router.accounting.pg import PgConfigError, PgTarget
from router.accounting.storage import budget_book, database_target, open_ledger
from router.app import Settings, create_app
from router.config import Budget, parse_config
from tests.unit.helpers import BASE_YAML, HOSTED, Clock, World, completion

NOON = 1710072000.0  # 2024-03-10 12:00 UTC
TTL = 30.0


Replica = Callable[..., Awaitable[tuple[PgBudgetBook, PgLedger]]]


@pytest.fixture
async def replica(pg_url: str) -> AsyncIterator[Replica]:
    """Each call: a new 'router process' (its own ledger, connections and book)."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(*, daily: float | None = None, caller_daily: float | None = None,
                       monthly: float | None = None,
                       clock: Callable[[], float] | None = None,
                       ) -> tuple[PgBudgetBook, PgLedger]:
            ledger = PgLedger(PgTarget.from_url(pg_url, "TEST_DATABASE_URL"))
            await stack.enter_async_context(ledger)
            callers = {} if caller_daily is None else {"app": Budget(daily_usd=caller_daily)}
            book = PgBudgetBook(Budget(daily_usd=daily, monthly_usd=monthly), callers, ledger,
                                hold_ttl_s=TTL, clock=clock or Clock(NOON))
            book.load(ledger)
            return book, ledger

        yield make


def holds(pg_url: str) -> int:
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        got = conn.execute("SELECT COUNT(*) FROM budget_holds").fetchone()
        assert got is not None
        return int(got[0])


async def test_two_replicas_racing_admit_exactly_what_fits(replica: Replica,
                                                           pg_url: str) -> None:
    a, la = await replica(daily=1.0)
    b, lb = await replica(daily=1.0)
    # 60 concurrent hosted reservations of 0.3 against 1.0: three fit, whoever asks.
    asks = [(book, f"c{i % 4}") for i in range(30) for book in (a, b)]
    got = await asyncio.gather(*(book.reserve(caller, 0.3) for book, caller in asks))
    admitted = [(book, r) for (book, _), r in zip(asks, got, strict=True) if r is not None]
    assert len(admitted) == 3
    assert holds(pg_url) == 3
    # Settling them spends 0.9: 0.1 left, for both replicas.
    for book, r in admitted:
        book.settle(r, 0.3)
    await la.flush()
    await lb.flush()
    assert holds(pg_url) == 0
    assert await b.reserve("c1", 0.2) is None
    assert await a.reserve("c2", 0.1) is not None


async def test_caller_and_global_budgets_both_hold(replica: Replica) -> None:
    a, _ = await replica(daily=1.0, caller_daily=0.5)
    b, _ = await replica(daily=1.0, caller_daily=0.5)
    assert await a.reserve("app", 0.4) is not None
    assert await b.reserve("app", 0.2) is None  # the caller's 0.5
    assert await b.reserve("other", 0.6) is not None  # the global 1.0
    assert await a.reserve("other", 0.1) is None
    with pytest.raises(ValueError):
        await a.reserve("app", -1.0)


async def test_settle_release_and_the_view(replica: Replica, pg_url: str) -> None:
    a, la = await replica(daily=1.0, caller_daily=0.8)
    b, lb = await replica(daily=1.0, caller_daily=0.8)
    r = await a.reserve("app", 0.5)
    assert r is not None
    a.release(r)
    a.release(r)  # a no-op, so a finally: may release unconditionally
    await la.flush()
    assert holds(pg_url) == 0  # a released hold is gone at the next commit
    r = await a.reserve("app", 0.5)
    assert r is not None
    a.settle(r, 0.7)  # cost more than estimated: the spend is the actual
    with pytest.raises(ValueError):
        a.settle(r, 0.7)
    await la.flush()
    await b.refresh()
    assert b.allowance("app") == pytest.approx(0.1)
    assert b.allowance("nobody") == pytest.approx(0.3)
    snap = b.snapshot()
    assert snap["global"] == {"daily": {"limit": 1.0, "spent": pytest.approx(0.7),
                                        "reserved": 0.0, "left": pytest.approx(0.3)},
                              "monthly": {"limit": None, "spent": pytest.approx(0.7),
                                          "reserved": 0.0, "left": None}}
    assert set(snap["callers"]) == {"app"}  # type: ignore[arg-type]
    await lb.flush()


async def test_a_restart_remembers_spend(replica: Replica) -> None:
    clock = Clock(NOON)
    first, ledger = await replica(daily=1.0, monthly=1.5, clock=clock)
    r = await first.reserve("app", 0.9)
    assert r is not None
    first.settle(r, 0.9)
    await ledger.stop()  # the process ends; its writer commits what was queued
    clock.now += 86400  # the next day: the daily budget is fresh, the month is not
    again, _ = await replica(daily=1.0, monthly=1.5, clock=clock)
    assert again.allowance("app") == pytest.approx(0.6)
    assert await again.reserve("app", 0.7) is None
    assert await again.reserve("app", 0.6) is not None


async def test_holds_of_a_crashed_replica_expire(replica: Replica) -> None:
    clock = Clock(NOON)
    doomed, _ = await replica(daily=1.0, clock=clock)
    assert await doomed.reserve("app", 1.0) is not None  # ... and it dies holding it
    survivor, _ = await replica(daily=1.0, clock=clock)
    assert await survivor.reserve("app", 0.5) is None
    clock.now += TTL + 1  # past the dead request's deadline
    assert await survivor.reserve("app", 1.0) is not None


async def test_no_budget_needs_no_round_trip_but_spend_is_counted(replica: Replica,
                                                                  pg_url: str) -> None:
    free, ledger = await replica()
    r = await free.reserve("app", 5.0)
    assert isinstance(r, Reservation)
    assert holds(pg_url) == 0
    free.settle(r, 2.0)
    await ledger.flush()
    limited, _ = await replica(daily=3.0)
    assert limited.allowance("app") == pytest.approx(1.0)


# -- configuration -------------------------------------------------------------------


def server_with(env_name: str | None) -> Any:
    data = yaml.safe_load(BASE_YAML)
    data["server"]["database_url_env"] = env_name
    return parse_config(yaml.safe_dump(data))


@pytest.mark.parametrize("env", [{}, {"SPILLOVER_DB": ""}, {"SPILLOVER_DB": "  "}])
def test_a_named_but_empty_url_variable_is_a_clear_error(env: dict[str, str]) -> None:
    cfg = server_with("SPILLOVER_DB")
    with pytest.raises(PgConfigError, match=r"SPILLOVER_DB.*not set or empty"):
        database_target(cfg.server, env)
    with pytest.raises(PgConfigError, match="SPILLOVER_DB"):
        create_app(Settings(env=env), config=cfg)


def test_a_bad_url_names_the_variable_never_the_password() -> None:
    cfg = server_with("SPILLOVER_DB")
    for url in ("mysql://u:hunter2@db/x", "postgresql://u:hunter2@db:5432/x?bogus=1"):
        with pytest.raises(PgConfigError) as info:
            database_target(cfg.server, {"SPILLOVER_DB": url})
        assert "hunter2" not in str(info.value) and "SPILLOVER_DB" in str(info.value)
    target = database_target(cfg.server, {"SPILLOVER_DB": "postgresql://u:hunter2@db:6543/x"})
    assert target is not None and target.where == "postgresql://db:6543/x"
    assert "hunter2" not in repr(target)


def test_no_variable_named_means_sqlite() -> None:
    cfg = server_with(None)
    assert database_target(cfg.server, {"SPILLOVER_DB": "postgresql://x/y"}) is None
    ledger = open_ledger(cfg.server, {})
    try:
        assert isinstance(budget_book(cfg, ledger), MemoryBudgetBook)
    finally:
        ledger.close()


# -- two router apps, one database ---------------------------------------------------------

WORST_USD = 1000 * 0.25 / 1e6  # max_tokens 1000 at $0.25/M out, input free


def shared_config(budget_usd: float) -> Any:
    data = yaml.safe_load(BASE_YAML)
    data["server"]["database_url_env"] = "SPILLOVER_DB"
    data["aliases"]["demo"]["hosted"][0]["price"] = {"input_per_mtok": 0.0,
                                                     "output_per_mtok": 0.25}
    data["budget"] = {"daily_usd": budget_usd}
    return parse_config(yaml.safe_dump(data))


async def test_two_router_apps_share_one_budget(pg_url: str) -> None:
    world = World(local_up=False)
    sync_handler = world.transport().handler

    async def handler(req: httpx.Request) -> httpx.Response:
        if str(req.url).startswith(HOSTED) and req.url.path.endswith("/chat/completions"):
            # Slow enough that every request reserves while the first ones are in flight.
            await asyncio.sleep(0.3)
            body = json.loads(req.content)
            return httpx.Response(200, json=completion(body["model"], usage=(10, 1000)))
        resp = sync_handler(req)
        assert isinstance(resp, httpx.Response)
        return resp

    env = {"MISTRAL_API_KEY": "sk-test-secret", "SPILLOVER_DB": pg_url}
    apps = [create_app(Settings(env=env), config=shared_config(5 * WORST_USD),
                       transport=httpx.MockTransport(handler)) for _ in range(2)]
    body = {"model": "demo", "max_tokens": 1000,
            "messages": [{"role": "user", "content": "hello"}]}
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
            clients.append(await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://router")))
        responses = await asyncio.gather(*(c.post("/v1/chat/completions", json=body)
                                           for _ in range(12) for c in clients))
        served = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(served) == 5
        assert {r.status_code for r in refused} == {429}
        assert {r.json()["error"]["code"] for r in refused} == {"budget_exceeded"}
        assert sum(float(r.headers["x-spillover-cost-usd"]) for r in served) <= 5 * WORST_USD
        # Both replicas' rows are in the one ledger, and `usage` reads them.
        usage = await clients[1].get("/v1/usage", params={"since": "0", "group_by": "route"})
    assert usage.status_code == 200, usage.text
    hosted = {g["route"]: g for g in usage.json()["data"]}["hosted"]
    assert (hosted["requests"], hosted["errors"]) == (24, 19)  # refusals are rows too
    assert hosted["cost_usd"] == pytest.approx(5 * WORST_USD)
    assert holds(pg_url) == 0


def write_config(tmp_path: Path, **server: object) -> Path:
    """models.yaml for the CLI: the unit tests' base with these server settings."""
    data = yaml.safe_load(BASE_YAML)
    data["server"].update(server)
    cfg = tmp_path / "models.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


@pytest.mark.parametrize("command", ["check", "usage"])
def test_commands_refuse_a_named_but_empty_url_variable(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from router.cli import main

    cfg = write_config(tmp_path, database_url_env="SPILLOVER_TEST_DB")
    monkeypatch.delenv("SPILLOVER_TEST_DB", raising=False)
    assert main([command, "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "SPILLOVER_TEST_DB, which is not set or empty" in err


async def test_a_database_that_does_not_answer_refuses_rather_than_overspends(
        replica: Replica) -> None:
    book, ledger = await replica(daily=1.0)
    await ledger.stop()
    assert await book.reserve("app", 0.1) is None


async def test_lost_connections_are_reopened(replica: Replica, pg_url: str) -> None:
    book, ledger = await replica(daily=1.0)
    assert await book.reserve("app", 0.1) is not None
    with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE application_name = 'spillover'")
    # The writer finds its connection dead and commits on a new one; the row is not lost.
    from tests.unit.test_ledger import row
    await ledger.record(row("after-restart"))
    assert [r.request_id for r in ledger.rows(since=0, until=2e9)] == ["after-restart"]
    # A reservation may fail once on the dead connection (refused: fail closed), then works.
    got = [await book.reserve("app", 0.1) for _ in range(2)]
    assert got[-1] is not None


@pytest.mark.parametrize("where", ["postgres", "sqlite"])
def test_serve_with_a_ledger_it_cannot_open_says_so_in_one_line(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from router.cli import main

    if where == "postgres":
        cfg = write_config(tmp_path, database_url_env="SPILLOVER_TEST_DB")
        # Port 1: nothing listens; the password must not show in what is printed.
        monkeypatch.setenv("SPILLOVER_TEST_DB", "postgresql://u:hunter2@127.0.0.1:1/db")
    else:
        blocker = tmp_path / "file"
        blocker.write_text("")
        cfg = write_config(tmp_path, ledger_path=str(blocker / "ledger.db"))  # under a file
    assert main(["serve", "--config", str(cfg), "--no-engines"]) == 1
    err = capsys.readouterr().err
    assert "the ledger cannot be opened" in err
    assert "Traceback" not in err and "hunter2" not in err


async def test_a_commit_lost_on_the_wire_is_not_applied_twice(
        replica: Replica, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_ledger import row

    book, ledger = await replica(daily=1.0)
    held = await book.reserve("app", 0.3)
    assert held is not None
    real = psycopg.Connection.transaction
    armed = [True]

    @contextlib.contextmanager
    def commit_then_lose_the_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        with real(self, *args, **kwargs) as tx:
            yield tx
        if armed[0]:  # the server committed; the answer never reaches the writer
            armed[0] = False
            self.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(psycopg.Connection, "transaction", commit_then_lose_the_connection)
    book.settle(held, 0.25)
    await ledger.record(row("once", caller="app"))
    await ledger.flush()
    monkeypatch.undo()
    assert not armed[0]  # the lost commit did happen
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM calls WHERE request_id = 'once'").fetchone()
        spent = conn.execute("SELECT spent FROM budget_spend WHERE scope = 'global'"
                             " AND period = 'daily'").fetchone()
    assert rows is not None and rows[0] == 1
    assert spent is not None and spent[0] == pytest.approx(0.25)
    assert holds(pg_url) == 0
