"""The ledger in PostgreSQL, so several router replicas share one call log and one set of
budgets. Same contract as `router.accounting.ledger.Ledger`: `await record(row)` returns
once the row is committed, a writer thread commits whatever is queued in one transaction (group
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

from router.accounting.ledger import (
    Dialect,
    LedgerBase,
    LedgerError,
    LedgerRow,
    StoreUnavailable,
    committed,
    resolve_waiters,
)
from router.accounting.ledger_spool import Drain, StoreHealth
from router.accounting.pg import (
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
_DRAIN_ITEMS = 1000  # spooled items written back per writer turn
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

    def __init__(self, target: PgTarget, *, health: StoreHealth | None = None) -> None:
        self._target = target
        self._health = health or StoreHealth(target.where)
        self._drain = None if self._health.spool is None else Drain(self._health.spool)
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
        if self._health.spool is not None:
            self._health.spool.close()
        self.close()

    def _writing(self) -> bool:
        return self._thread is not None

    @property
    def accepting(self) -> bool:
        return self._accepting

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
        health = self._health
        try:
            stopping = False
            drain_at = 0.0
            while not stopping:
                batch: list[_Pending] = []
                waiting = health.backlog or health.failing
                item: _Pending | None
                try:
                    # While rows wait in the spool, wake up for the next slice.
                    item = self._queue.get(
                        timeout=max(0.0, drain_at - time.monotonic()) if waiting else None)
                    idle = False
                except queue.Empty:
                    item, idle = None, True
                while not idle:
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
                if waiting and not stopping and time.monotonic() >= drain_at:
                    conn, more = self._drain_slice(conn)
                    drain_at = 0.0 if more else time.monotonic() + health.retry_s
                if batch:
                    conn = self._commit(conn, batch)
        finally:
            conn.close()

    def _commit(self, conn: Conn, batch: list[_Pending]) -> Conn:
        """Commit the batch, or spool it when the store fails; returns the connection to
        use next (a fresh one after a connection was lost)."""
        health = self._health
        items = [item for item, _, _ in batch]
        errors: list[str | LedgerError | None] = [None] * len(batch)
        if health.failing and health.spool_error is None:
            # The store is known to fail: straight to the spool; the drain writes them.
            errors = [self._keep(os.urandom(16).hex(), items)] * len(batch)
        else:
            batch_id = os.urandom(16).hex()
            try:
                conn = self._transact(conn, items, batch_id)
                health.recovered()
            except Exception as exc:
                if _store_failure(exc):
                    health.failed(exc)
                    # Under the id it was tried with: if its COMMIT did reach the server
                    # after all, the drain finds the mark and does not apply it twice.
                    errors = [self._keep(batch_id, items)] * len(batch)
                else:
                    conn, errors = self._one_by_one(conn, items)
        waiting: dict[asyncio.AbstractEventLoop,
                      list[tuple[asyncio.Future[None], str | LedgerError | None]]] = {}
        for (_, loop, done), error in zip(batch, errors, strict=True):
            if loop is not None and done is not None:
                waiting.setdefault(loop, []).append((done, error))
        for loop, outcomes in waiting.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(resolve_waiters, outcomes)
        return conn

    def _one_by_one(self, conn: Conn,
                    items: list[_Item]) -> tuple[Conn, list[str | LedgerError | None]]:
        """One bad row must not cost the others theirs: retry them one by one."""
        errors: list[str | LedgerError | None] = []
        for i, item in enumerate(items):
            batch_id = os.urandom(16).hex()
            try:
                conn = self._transact(conn, [item], batch_id)
                errors.append(None)
            except Exception as exc:
                # The writer thread must survive anything: waiters would hang forever.
                if _store_failure(exc):
                    self._health.failed(exc)
                    kept = self._keep(batch_id, items[i:])
                    errors.extend([kept] * (len(items) - i))
                    break
                log.error("ledger: %s not committed: %s", _describe(item), exc)
                errors.append(str(exc))
        return conn, errors

    def _keep(self, batch_id: str, items: Sequence[_Item]) -> LedgerError | None:
        kept = [item for item in items if not isinstance(item, _Barrier)]
        if not kept:
            return None
        rows = sum(isinstance(item, LedgerRow) for item in kept)
        served = [not isinstance(item, LedgerRow) or item.route != "" for item in kept]
        error = self._health.keep(batch_id, [_encode(item) for item in kept], rows, served)
        return None if error is None else StoreUnavailable(f"ledger row not kept: {error}")

    def _drain_slice(self, conn: Conn) -> tuple[Conn, bool]:
        """Write one slice of the spool to the store, on the writer thread, so rows queued
        meanwhile wait one slice at most; (connection, True while more may follow). With
        nothing spooled, an empty transaction tells whether the store answers again."""
        health, drain = self._health, self._drain
        try:
            batches = [] if drain is None else drain.take(_DRAIN_ITEMS)
            if drain is None or not batches:
                if health.failing:
                    conn = self._transact(conn, [], os.urandom(16).hex())
                    health.recovered()
                return conn, False
            decoded = [(batch_id, [_decode(e) for e in encoded]) for batch_id, encoded in batches]
            try:
                conn = self._alive(conn)
                # The slice in one transaction, each batch under its own mark: a commit lost
                # on the wire is retried with the slice, and what did commit is skipped.
                with conn.transaction():
                    for batch_id, items in decoded:
                        if not _done(conn, batch_id, items):
                            conn.execute("INSERT INTO ledger_batches (id, at) VALUES (%s, %s)",
                                         (batch_id, time.time()))
                            _apply(conn, items)
            except Exception as exc:
                if _store_failure(exc):
                    raise
                # One batch the store refuses: the others one by one.
                for batch_id, items in decoded:
                    try:
                        conn = self._transact(conn, items, batch_id, once=True)
                    except Exception as err:
                        if _store_failure(err):
                            raise
                        # Not the store's fault: retrying would block the spool forever.
                        log.error("ledger: spooled batch %s not committed: %s", batch_id, err)
                        health.rows_lost += sum(isinstance(i, LedgerRow) for i in items)
            drain.committed()
            if drain.caught_up:
                # Everything spooled before this pass is in: new rows go to the store
                # again (what they spooled meanwhile drains in the background).
                health.recovered()
            return conn, True
        except Exception as exc:  # the writer thread must survive anything
            if drain is not None:
                drain.reset()
            health.failed(exc)
            return conn, False

    def _transact(self, conn: Conn, items: Sequence[_Item], batch_id: str, *,
                  once: bool = False) -> Conn:
        """Apply `items` in one transaction, marked with `batch_id`; returns the connection
        to use next. A connection lost during COMMIT leaves it unknown whether the server
        committed: the mark says, and a committed batch is not applied again. `once`: skip
        a batch that is in already (a spooled one, by its mark or its first row)."""
        conn = self._alive(conn)
        now = time.time()
        self._marks += 1
        try:
            with conn.transaction():
                if once and _done(conn, batch_id, items):
                    return conn
                conn.execute("INSERT INTO ledger_batches (id, at) VALUES (%s, %s)",
                             (batch_id, now))
                if self._marks % _PURGE_MARKS_EVERY == 0:
                    # A mark is only ever looked up right after its own commit, or by a
                    # spool drain, which also looks for the batch's first row.
                    conn.execute("DELETE FROM ledger_batches WHERE at < %s",
                                 (now - _MARK_TTL_S,))
                _apply(conn, items)
        except psycopg.OperationalError:
            if not (conn.closed or conn.broken):
                raise
            conn = self._alive(conn)  # raises while the server cannot be reached
            done = conn.execute("SELECT 1 FROM ledger_batches WHERE id = %s",
                                (batch_id,)).fetchone()
            conn.commit()
            if done is None:
                # Not committed, and the server answers again (a restart, a failover):
                # once more on the fresh connection.
                with conn.transaction():
                    conn.execute("INSERT INTO ledger_batches (id, at) VALUES (%s, %s)",
                                 (batch_id, now))
                    _apply(conn, items)
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
        for attempt in (1, 2):
            conn = self._budget_conn
            if conn is None or conn.closed or conn.broken:
                if conn is not None:
                    conn.close()
                conn = self._budget_conn = self._connect(RESERVE_STATEMENT_TIMEOUT_MS)
            try:
                return fn(conn)
            except psycopg.OperationalError:
                # A connection the server dropped (a restart) gets one fresh try; a hold
                # it may have committed expires at its deadline, the safe side.
                if attempt == 2 or not conn.broken:
                    raise
        raise AssertionError("unreachable")

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


def _store_failure(exc: BaseException) -> bool:
    """The store fails (unreachable, restarting, timing out), as opposed to one item it
    refuses (a constraint, a value out of range)."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | LedgerError)


def _done(conn: Conn, batch_id: str, items: Sequence[_Item]) -> bool:
    if conn.execute("SELECT 1 FROM ledger_batches WHERE id = %s", (batch_id,)).fetchone():
        return True

    def exists(row: LedgerRow) -> bool:
        return conn.execute(
            "SELECT 1 FROM calls WHERE caller = %s AND ts = %s AND request_id = %s LIMIT 1",
            (row.caller, row.ts, row.request_id)).fetchone() is not None

    return committed(next((i for i in items if isinstance(i, LedgerRow)), None), exists)


def _encode(item: _Item) -> list[Any]:
    if isinstance(item, LedgerRow):
        return ["row", *item]
    if isinstance(item, HoldSettled):
        return ["settled", *item]
    return ["released", *item]


def _decode(encoded: list[Any]) -> _Item:
    kind, fields = encoded[0], encoded[1:]
    if kind == "row":
        return LedgerRow(*fields)
    if kind == "settled":
        return HoldSettled(*fields)
    return HoldReleased(*fields)


def _describe(item: _Item) -> str:
    if isinstance(item, LedgerRow):
        return f"row {item.request_id}"
    if isinstance(item, _Barrier):
        return "flush"
    return f"budget hold {item.hold_id}"
