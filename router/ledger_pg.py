"""The ledger in PostgreSQL, so several router replicas share one call log and one set of
budgets. Same contract as `router.ledger.Ledger`: `await record(row)` returns once the row
is committed, a writer thread commits whatever is queued in one transaction (group
commit), one bad row does not cost the others theirs.

The writer also applies the budget holds' outcomes (`HoldSettled`, `HoldReleased`) in the
same transactions, so a hold turns into spend atomically: no reservation anywhere ever sees
the money twice or not at all. Reservations themselves run on a connection of their own
(`budget_call`), one at a time per replica, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeAlias, TypeVar

import psycopg

from router.ledger import (
    Dialect,
    LedgerBase,
    LedgerError,
    LedgerRow,
    resolve_waiters,
)
from router.pg import (
    GLOBAL_SCOPE,
    READ_STATEMENT_TIMEOUT_MS,
    RESERVE_STATEMENT_TIMEOUT_MS,
    WRITE_STATEMENT_TIMEOUT_MS,
    PgTarget,
    connect,
    ensure_schema,
    scope_of,
)

log = logging.getLogger("spillover.ledger")

_MAX_BATCH = 2048
# Batch marks (see _transact) are dropped after an hour, checked every so many commits.
_MARK_TTL_S = 3600.0
_PURGE_MARKS_EVERY = 1000
_COLUMNS = LedgerRow._fields
_INSERT = f"INSERT INTO calls ({', '.join(_COLUMNS)}) VALUES ({', '.join('%s' for _ in _COLUMNS)})"
_PG = Dialect(
    "%s",
    "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "COUNT(*) FILTER (WHERE status >= 400)",
)
_ADD_SPEND = (
    "INSERT INTO budget_spend (scope, period, start, spent) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (scope, period, start) DO UPDATE SET spent = budget_spend.spent + EXCLUDED.spent"
)

Conn: TypeAlias = psycopg.Connection[tuple[Any, ...]]
T = TypeVar("T")


class HoldSettled(NamedTuple):
    """A hosted call ended: its hold becomes `amount_usd` of spend in these windows."""

    hold_id: int
    caller: str
    amount_usd: float
    day: float
    month: float


class HoldReleased(NamedTuple):
    """The call never happened: the hold goes, nothing is spent."""

    hold_id: int


class _Barrier(NamedTuple):
    """Writes nothing: its waiter wakes once everything queued before it is committed."""


_Item: TypeAlias = LedgerRow | HoldSettled | HoldReleased | _Barrier
_Pending: TypeAlias = tuple[
    _Item, asyncio.AbstractEventLoop | None, asyncio.Future[None] | None
]


class PgLedger(LedgerBase):
    """Reads work from construction (which also creates the schema); writes need start()."""

    _dialect = _PG

    def __init__(self, target: PgTarget) -> None:
        self._target = target
        self._read: Conn = self._connect(READ_STATEMENT_TIMEOUT_MS, autocommit=True)
        self._read_lock = threading.Lock()
        try:
            ensure_schema(self._read)
        except BaseException:
            self._read.close()
            raise
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._marks = 0  # writer transactions so far (the writer thread's own count)
        self._thread: threading.Thread | None = None
        self._budget_pool: ThreadPoolExecutor | None = None
        self._budget_conn: Conn | None = None
        self._accepting = False
        self._closed = False

    @property
    def path(self) -> str:
        return self._target.where

    def _connect(self, statement_timeout_ms: int, *, autocommit: bool = False) -> Conn:
        try:
            return connect(self._target, statement_timeout_ms=statement_timeout_ms,
                           autocommit=autocommit)
        except ConnectionError as exc:
            raise LedgerError(str(exc)) from None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise LedgerError("the ledger is closed")
        if self._thread is not None:
            return
        # Opened here so that a database that cannot be reached fails start().
        conn = await asyncio.to_thread(self._connect, WRITE_STATEMENT_TIMEOUT_MS)
        self._budget_conn = await asyncio.to_thread(
            self._connect, RESERVE_STATEMENT_TIMEOUT_MS)
        # One worker: reservations serialise on a database lock anyway, and a single
        # thread keeps them from tying up the loop's default pool while they queue.
        self._budget_pool = ThreadPoolExecutor(1, thread_name_prefix="budget-pg")
        self._thread = threading.Thread(target=self._writer, args=(conn,),
                                        name="ledger-writer-pg", daemon=True)
        self._thread.start()
        self._accepting = True
        log.info("ledger: PostgreSQL at %s", self._target.where)

    async def stop(self) -> None:
        self._accepting = False
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._budget_pool is not None:
            # A reservation in flight finishes (bounded by its statement timeout) first.
            await asyncio.to_thread(self._budget_pool.shutdown, True)
            self._budget_pool = None
        if self._budget_conn is not None:
            self._budget_conn.close()
            self._budget_conn = None
        self.close()

    def _writing(self) -> bool:
        return self._thread is not None

    # -- writes --------------------------------------------------------------------

    async def record(self, row: LedgerRow) -> None:
        """Return once `row` is committed. Cancelling the wait does not withdraw the row."""
        self._check_accepting()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((row, loop, done))
        await done

    def record_nowait(self, row: LedgerRow) -> None:
        self._check_accepting()
        self._queue.put((row, None, None))

    def hold_done(self, outcome: HoldSettled | HoldReleased) -> None:
        """Queue a hold's outcome; committed with the next batch (milliseconds)."""
        self._check_accepting()
        self._queue.put((outcome, None, None))

    async def flush(self) -> None:
        """Return once everything queued so far (rows, hold outcomes) is committed."""
        self._check_accepting()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((_Barrier(), loop, done))
        await done

    def _writer(self, conn: Conn) -> None:
        try:
            stopping = False
            while not stopping:
                batch: list[_Pending] = []
                item = self._queue.get()
                while True:
                    if item is None:
                        stopping = True
                        break
                    batch.append(item)
                    if len(batch) >= _MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    conn = self._commit(conn, batch)
        finally:
            conn.close()

    def _commit(self, conn: Conn, batch: list[_Pending]) -> Conn:
        """Commit the batch; returns the connection to use next (a fresh one after a
        connection was lost)."""
        errors: list[str | None] = [None] * len(batch)
        try:
            conn = self._transact(conn, [item for item, _, _ in batch])
        except Exception:
            # One bad row must not cost the others theirs: retry them one by one.
            for i, (item, _, _) in enumerate(batch):
                try:
                    conn = self._transact(conn, [item])
                except Exception as exc:
                    # The writer thread must survive anything: waiters would hang forever.
                    log.exception("ledger: %s not committed", _describe(item))
                    errors[i] = str(exc)
        waiting: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], str | None]]]
        waiting = {}
        for (_, loop, done), error in zip(batch, errors, strict=True):
            if loop is not None and done is not None:
                waiting.setdefault(loop, []).append((done, error))
        for loop, outcomes in waiting.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(resolve_waiters, outcomes)
        return conn

    def _transact(self, conn: Conn, items: Sequence[_Item]) -> Conn:
        """Apply `items` in one transaction, marked with a batch id; returns the connection
        to use next. A connection lost during COMMIT leaves it unknown whether the server
        committed: the mark says, and a committed batch is not applied again."""
        batch_id = os.urandom(16).hex()
        conn = self._alive(conn)
        now = time.time()
        self._marks += 1
        try:
            with conn.transaction():
                conn.execute("INSERT INTO ledger_batches (id, at) VALUES (%s, %s)",
                             (batch_id, now))
                if self._marks % _PURGE_MARKS_EVERY == 0:
                    # A mark is only ever looked up right after its own commit.
                    conn.execute("DELETE FROM ledger_batches WHERE at < %s",
                                 (now - _MARK_TTL_S,))
                _apply(conn, items)
        except psycopg.OperationalError:
            if not (conn.closed or conn.broken):
                raise
            conn = self._alive(conn)
            done = conn.execute("SELECT 1 FROM ledger_batches WHERE id = %s",
                                (batch_id,)).fetchone()
            conn.commit()
            if done is None:
                raise
        return conn

    def _alive(self, conn: Conn) -> Conn:
        if conn.closed or conn.broken:
            conn.close()
            conn = self._connect(WRITE_STATEMENT_TIMEOUT_MS)
        return conn

    # -- budgets ---------------------------------------------------------------------

    async def budget_call(self, fn: Callable[[Conn], T]) -> T:
        """Run `fn(connection)` on the budget connection's thread; `fn` owns the
        transaction. One at a time per replica."""
        self._check_accepting()
        pool = self._budget_pool
        assert pool is not None
        return await asyncio.get_running_loop().run_in_executor(pool, self._on_budget_conn, fn)

    def _on_budget_conn(self, fn: Callable[[Conn], T]) -> T:
        conn = self._budget_conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._budget_conn = self._connect(RESERVE_STATEMENT_TIMEOUT_MS)
        return fn(conn)

    def read(self, fn: Callable[[Conn], T]) -> T:
        """Run `fn(connection)` on the (autocommit) read connection."""
        with self._read_lock:
            if self._closed:
                raise LedgerError("the ledger is closed")
            try:
                return fn(self._read)
            except psycopg.OperationalError:
                if not self._read.broken:
                    raise
            # The server dropped the connection (a restart, a failover): reads are
            # idempotent, so one retry on a fresh connection.
            self._read.close()
            self._read = self._connect(READ_STATEMENT_TIMEOUT_MS, autocommit=True)
            return fn(self._read)

    # -- reads ---------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        def run(conn: Conn) -> list[tuple[Any, ...]]:
            return conn.execute(sql, params).fetchall()

        try:
            return self.read(run)
        except psycopg.Error as exc:
            raise LedgerError(f"ledger read failed: {exc}") from None


def _apply(conn: Conn, items: Sequence[_Item]) -> None:
    """Everything a batch does, inside the caller's transaction."""
    rows = [item for item in items if isinstance(item, LedgerRow)]
    gone = [item.hold_id for item in items if isinstance(item, HoldSettled | HoldReleased)]
    spend: dict[tuple[str, str, float], float] = {}
    for item in items:
        if isinstance(item, HoldSettled) and item.amount_usd > 0:
            for scope in (scope_of(item.caller), GLOBAL_SCOPE):
                for period, start in (("daily", item.day), ("monthly", item.month)):
                    key = (scope, period, start)
                    spend[key] = spend.get(key, 0.0) + item.amount_usd
    with conn.cursor() as cur:
        if rows:
            cur.executemany(_INSERT, rows)
        if gone:
            cur.execute("DELETE FROM budget_holds WHERE id = ANY(%s)", (gone,))
        if spend:
            # Sorted: replicas' writers lock the same rows in the same order, so two of
            # them never deadlock on one another.
            cur.executemany(_ADD_SPEND, [(*key, amount) for key, amount in sorted(spend.items())])


def _describe(item: _Item) -> str:
    if isinstance(item, LedgerRow):
        return f"row {item.request_id}"
    if isinstance(item, _Barrier):
        return "flush"
    return f"budget hold {item.hold_id}"
