"""The ledger: one SQLite row per call, committed before the response finishes.

Every request writes one row, so at a few thousand requests a second a commit per row
would be the bottleneck. Rows are committed on the event loop, all the rows queued within
one turn of the loop in a single transaction (group commit), and each `await record(row)`
returns once its transaction is in the WAL. A commit in WAL mode without fsync costs a
request less than a hand-off to a writer thread and back (docs/performance.md); the one
slow part of SQLite writes, the checkpoint that folds
the WAL back into the database, runs in a worker thread and blocks no writer. Reads use
their own connection from worker threads: in WAL mode readers and the writer do not block
each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Self, TypeAlias

from router.accounting.ledger_spool import Drain, StoreHealth

log = logging.getLogger("spillover.ledger")

MEMORY = ":memory:"
GROUP_KEYS = frozenset({"caller", "alias", "route", "backend", "day", "batch", "priority"})

_BUSY_TIMEOUT_MS = 5000
# Fold the WAL into the database this often (in a worker thread) while rows come in.
_CHECKPOINT_S = 1.0


class LedgerRow(NamedTuple):
    """A tuple, so sqlite binds it as it is: no per-row copy on the hot path."""

    ts: float  # unix time the call started
    request_id: str
    caller: str
    alias: str
    route: str  # "local" | "hosted" | "" (refused before routing)
    backend: str  # deployment or provider name, "" if none
    model_id: str  # upstream model id, "" if none
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float  # hosted: the provider's price; local: the local cost
    hosted_equiv_usd: float  # the alias's hosted price for the same tokens: savings
    latency_s: float
    ttft_s: float | None
    status: int
    reason: str
    endpoint: str  # chat | completions | fim | embeddings | messages
    batch_id: str = ""  # the /v1/batches batch this call was a line of, "" for none
    priority: str = "interactive"  # the traffic class: interactive | standard | batch
    tier: str = ""  # a tiered alias's call: the tier (a plain alias) it went to
    score: float | None = None  # and the score that chose it (spillover tiers calibrate)
    escalation: str = ""  # why that tier: none | score | sticky | pinned | capped | ...
    wasted: str = ""  # the cascade trigger that sent this answer to the next tier


# `wasted` of a batch line attempt that a restart ran again (router.accounting.batches):
# its cost stays in the totals, its request is not counted again (the rerun's row is).
BATCH_RERUN = "batch-rerun"


_COLUMNS = LedgerRow._fields
_INSERT = (
    f"INSERT INTO calls ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
)
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS calls (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        request_id TEXT NOT NULL,
        caller TEXT NOT NULL,
        alias TEXT NOT NULL,
        route TEXT NOT NULL,
        backend TEXT NOT NULL,
        model_id TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        hosted_equiv_usd REAL NOT NULL,
        latency_s REAL NOT NULL,
        ttft_s REAL,
        status INTEGER NOT NULL,
        reason TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        batch_id TEXT NOT NULL DEFAULT '',
        priority TEXT NOT NULL DEFAULT 'interactive',
        tier TEXT NOT NULL DEFAULT '',
        score REAL,
        escalation TEXT NOT NULL DEFAULT '',
        wasted TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts)",
    "CREATE INDEX IF NOT EXISTS calls_caller_ts ON calls (caller, ts)",
    # Written only to find out whether a failed store takes writes again (see _drain).
    "CREATE TABLE IF NOT EXISTS ledger_batches (id TEXT PRIMARY KEY, at REAL NOT NULL)",
)
_PROBE = "INSERT INTO ledger_batches (id, at) VALUES (?, ?)"
# Spooled items written back to the store in one transaction (one turn of the loop).
_DRAIN_ITEMS = 1000


class Dialect(NamedTuple):
    """What the usage query spells differently in SQLite and PostgreSQL."""

    param: str
    day: str
    errors: str


_SQLITE = Dialect("?", "strftime('%Y-%m-%d', ts, 'unixepoch')", "COALESCE(SUM(status >= 400), 0)")

# A row waiting for the next commit, and its waiter (None for record_nowait).
_Pending: TypeAlias = tuple[LedgerRow, asyncio.Future[None] | None]


class CallLedger(Protocol):
    """What the gateway, the budgets and the usage reports need of a ledger: `Ledger`
    (SQLite, one process) or `PgLedger` (PostgreSQL, shared by replicas)."""

    @property
    def path(self) -> str: ...  # where the rows live, safe to log (no password)
    @property
    def health(self) -> StoreHealth: ...  # the store's state, the policy when it fails
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def close(self) -> None: ...
    async def record(self, row: LedgerRow) -> None: ...
    def record_nowait(self, row: LedgerRow) -> None: ...
    def spend(self, *, since: float, caller: str | None = None,
              route: str = "hosted") -> float: ...
    def spend_by_caller(self, *, since: float, route: str = "hosted") -> dict[str, float]: ...
    def usage(self, *, since: float, until: float, group_by: Sequence[str],
              caller: str | None = None) -> list[dict[str, object]]: ...
    def rows(self, *, since: float, until: float, caller: str | None = None,
             limit: int = 1000) -> list[LedgerRow]: ...


class LedgerError(RuntimeError):
    """A row could not be committed, or the ledger is not running."""


class StoreUnavailable(LedgerError):
    """The store does not answer (and, for a row, the spool could not keep it either):
    counted and logged once by `StoreHealth`, not once per row."""


def store_failure(exc: sqlite3.Error) -> bool:
    """The store fails (full disk, I/O error, read-only, damaged file), as opposed to one
    row it refuses (a constraint, a value it cannot bind)."""
    return not isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError
                          | sqlite3.InterfaceError | sqlite3.DataError)


class LedgerBase:
    """What both stores do alike: the lifecycle around their writer and the reads. A store
    gives its dialect, its read connection and lock, `start`/`stop`, `_writing` and
    `_query`."""

    _dialect: Dialect
    _read: Any  # a DB-API connection: sqlite3's or psycopg's
    _read_lock: threading.Lock
    _accepting: bool
    _closed: bool
    _health: StoreHealth

    @property
    def health(self) -> StoreHealth:
        return self._health

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def _writing(self) -> bool:
        raise NotImplementedError

    def _query(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def close(self) -> None:
        """Close without a writer (a ledger only read from); `stop()` for a started one."""
        if self._writing():
            raise LedgerError("stop() the ledger before closing it")
        self._accepting = False
        if not self._closed:
            self._closed = True
            with self._read_lock:
                self._read.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise LedgerError("the ledger is not running")

    def spend(self, *, since: float, caller: str | None = None, route: str = "hosted") -> float:
        """Sum of cost_usd of the calls on `route` since `since` (caller None: everyone)."""
        p = self._dialect.param
        sql = f"SELECT COALESCE(SUM(cost_usd), 0.0) FROM calls WHERE ts >= {p} AND route = {p}"
        params: list[object] = [since, route]
        if caller is not None:
            sql += f" AND caller = {p}"
            params.append(caller)
        return float(self._query(sql, params)[0][0])

    def spend_by_caller(self, *, since: float, route: str = "hosted") -> dict[str, float]:
        """`spend` for every caller with calls on `route` since `since`, in one query."""
        p = self._dialect.param
        sql = (f"SELECT caller, SUM(cost_usd) FROM calls WHERE ts >= {p} AND route = {p}"
               " GROUP BY caller ORDER BY caller")
        return {caller: float(cost) for caller, cost in self._query(sql, [since, route])}

    def usage(
        self,
        *,
        since: float,
        until: float,
        group_by: Sequence[str],
        caller: str | None = None,
    ) -> list[dict[str, object]]:
        """Totals per group of the calls with since <= ts < until, ordered by the group keys.

        `group_by` is a subset of caller, alias, route, backend and day (UTC, YYYY-MM-DD).
        """
        keys, sql, params = usage_sql(self._dialect, since, until, group_by, caller)
        return usage_totals(keys, self._query(sql, params))

    def rows(
        self, *, since: float, until: float, caller: str | None = None, limit: int = 1000
    ) -> list[LedgerRow]:
        """The calls with since <= ts < until, oldest first, at most `limit`."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        p = self._dialect.param
        sql = f"SELECT {', '.join(_COLUMNS)} FROM calls WHERE ts >= {p} AND ts < {p}"
        params: list[object] = [since, until]
        if caller is not None:
            sql += f" AND caller = {p}"
            params.append(caller)
        sql += f" ORDER BY ts, id LIMIT {p}"
        params.append(limit)
        return [LedgerRow(*record) for record in self._query(sql, params)]


class Ledger(LedgerBase):
    """Append-only call log. Reads work from construction; writes need `start()`."""

    _dialect = _SQLITE

    def __init__(self, path: str | os.PathLike[str], *,
                 checkpoint_s: float = _CHECKPOINT_S, health: StoreHealth | None = None) -> None:
        self._path = os.fspath(path)
        # Without a spool (tests, tools that only read) rows the store refuses are lost,
        # counted in the health's rows_lost.
        self._health = health or StoreHealth(self._path)
        self._checkpoint_s = checkpoint_s
        self._memory = self._path == MEMORY
        try:
            if not self._memory:
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            # Reads come from worker threads (asyncio.to_thread), so the read connection
            # is shared across threads and serialised by a lock.
            self._read: sqlite3.Connection = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot open the ledger at {self._path}: {exc}") from None
        self._read_lock = threading.Lock()
        try:
            with self._read:
                for statement in _SCHEMA:
                    self._read.execute(statement)
                _add_batch_column(self._read)
                _add_priority_column(self._read)
                _add_tier_columns(self._read)
        except BaseException:
            self._read.close()
            raise
        self._pending: list[_Pending] = []
        self._flush_at: asyncio.Handle | None = None
        self._write: sqlite3.Connection | None = None
        self._write_lock: threading.Lock | contextlib.nullcontext[None] = (
            contextlib.nullcontext())
        self._checkpointer: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        spool = self._health.spool
        self._drain = None if spool is None else Drain(spool)
        self._dirty = False
        self._accepting = False
        self._closed = False

    @property
    def path(self) -> str:
        return self._path

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        # WAL + synchronous=NORMAL: a commit is in the WAL file before it returns, so it
        # survives the process being killed (kill -9); only a power cut or OS crash can
        # lose the last commits, which FULL would prevent at one fsync per batch.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise LedgerError("the ledger is closed")
        if self._write is not None:
            return
        # A memory database exists once per connection, so there writes share the read
        # connection and its lock (reads run in worker threads).
        if self._memory:
            self._write, self._write_lock = self._read, self._read_lock
        else:
            self._write = self._connect()
            # Checkpoints happen in the checkpointer's thread, never inside a commit on
            # the event loop.
            self._write.execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpointer = asyncio.create_task(self._checkpoints(),
                                                     name="spillover-ledger-checkpoint")
        self._drainer = asyncio.create_task(self._drains(), name="spillover-ledger-drain")
        self._accepting = True

    async def stop(self) -> None:
        """Commit every queued row, fold the WAL in and close the connections."""
        self._accepting = False
        if self._write is None:
            self.close()
            return
        self._flush()
        if self._drainer is not None:
            # Rows still in the spool stay there, durable: the next start writes them.
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
            self._drainer = None
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
            try:
                await asyncio.to_thread(self._checkpoint)
            except sqlite3.Error as exc:  # the WAL keeps the rows; the next start folds it
                log.warning("ledger checkpoint at stop failed: %s", exc)
        if self._write is not self._read:
            self._write.close()
        self._write = None
        if self._health.spool is not None:
            self._health.spool.close()
        self.close()

    def _writing(self) -> bool:
        return self._write is not None

    # -- writes --------------------------------------------------------------------

    async def record(self, row: LedgerRow) -> None:
        """Return once `row` is committed. Cancelling the wait does not withdraw the row."""
        self._check_accepting()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, done))
        self._schedule()
        await done

    def record_nowait(self, row: LedgerRow) -> None:
        """Queue `row` without waiting for its commit (the caller is already gone)."""
        self._check_accepting()
        self._pending.append((row, None))
        self._schedule()

    def _schedule(self) -> None:
        if self._flush_at is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a stream finalised at shutdown): commit now
                self._flush()
                return
            # Every row queued until the loop comes round again joins this commit.
            self._flush_at = loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        batch, self._pending = self._pending, []
        conn = self._write
        if not batch or conn is None:
            return
        rows = [row for row, _ in batch]
        errors: list[str | LedgerError | None] = [None] * len(batch)
        if self.health.failing and self.health.spool_error is None:
            # The store is known to fail: straight to the spool, where the drain writes
            # them from (and finds out when the store answers again).
            errors = [self._keep(rows)] * len(batch)
        else:
            try:
                with self._write_lock, conn:  # one transaction: committed, or rolled back
                    conn.executemany(_INSERT, rows)
                self.health.recovered()
            except sqlite3.Error as exc:
                if store_failure(exc):
                    # The disk is full, unwritable, the file damaged: no row would go in.
                    self.health.failed(exc)
                    errors = [self._keep(rows)] * len(batch)
                else:
                    errors = self._one_by_one(conn, rows)
        self._dirty = True
        resolve_waiters([(done, error) for (_, done), error in zip(batch, errors, strict=True)
                         if done is not None])

    def _one_by_one(self, conn: sqlite3.Connection,
                    rows: list[LedgerRow]) -> list[str | LedgerError | None]:
        """One bad row must not cost the others theirs: retry them one by one, so only the
        rows that cannot be written fail."""
        errors: list[str | LedgerError | None] = []
        for row in rows:
            try:
                with self._write_lock, conn:
                    conn.execute(_INSERT, row)
                errors.append(None)
            except sqlite3.Error as exc:
                if store_failure(exc):
                    self.health.failed(exc)
                    errors.append(self._keep([row]))
                else:
                    log.error("ledger: row %s not committed: %s", row.request_id, exc)
                    errors.append(str(exc))
        return errors

    def _keep(self, rows: list[LedgerRow]) -> LedgerError | None:
        error = self.health.keep(os.urandom(16).hex(), [["row", *row] for row in rows],
                                 len(rows), [row.route != "" for row in rows])
        return None if error is None else StoreUnavailable(f"ledger row not kept: {error}")

    async def _drains(self) -> None:
        """While rows wait in the spool or the store fails: try the store again, every
        `retry_s`, and write the spooled rows to it, a slice per turn of the loop."""
        while True:
            await asyncio.sleep(self._health.retry_s)
            while self._health.backlog or self._health.failing:
                if not self._drain_slice():
                    break
                await asyncio.sleep(0)  # other requests' commits go on meanwhile

    def _drain_slice(self) -> bool:
        """Write one slice of the spool to the store; True while more may follow."""
        conn, health, drain = self._write, self._health, self._drain
        if conn is None:
            return False
        try:
            batches = [] if drain is None else drain.take(_DRAIN_ITEMS)
            if drain is None or not batches:
                if health.failing:
                    with self._write_lock, conn:  # a real write: does the store take one?
                        conn.execute(_PROBE, (os.urandom(16).hex(), time.time()))
                        conn.execute("DELETE FROM ledger_batches")
                    health.recovered()
                return False
            # One transaction for the slice: every spooled batch on its own would write
            # its pages to the WAL again, and the WAL is what fills a full disk back up.
            with self._write_lock, conn:
                for _, items in batches:
                    rows = [LedgerRow(*item[1:]) for item in items if item[0] == "row"]
                    if rows and not _exists(conn, rows[0]):
                        conn.executemany(_INSERT, rows)
            self._dirty = True
            drain.committed()
            if drain.caught_up:
                # Everything spooled before this pass is in: the rows of new calls go to
                # the store again (what they spooled meanwhile drains in the background).
                health.recovered()
            return True
        except (sqlite3.Error, OSError, TypeError, ValueError) as exc:
            if drain is not None:
                drain.reset()
            health.failed(exc)
            return False

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(self._checkpoint_s)
            if self._dirty:
                self._dirty = False
                try:
                    await asyncio.to_thread(self._checkpoint)
                except sqlite3.Error as exc:  # retried next time; the WAL only grows
                    if not self._health.failing:  # said once, by the health, meanwhile
                        log.warning("ledger checkpoint failed: %s", exc)

    def _checkpoint(self) -> None:
        """PASSIVE: copies what no reader still needs, without waiting for anyone."""
        conn = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    # -- reads ---------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        with self._read_lock:
            if self._closed:
                raise LedgerError("the ledger is closed")
            cursor = self._read.execute(sql, params)
            try:
                return cursor.fetchall()
            finally:
                cursor.close()


def _add_batch_column(conn: sqlite3.Connection) -> None:
    """A ledger written before the Batch API has no batch_id column: add it (once)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(calls)")}
    if "batch_id" not in columns:
        conn.execute("ALTER TABLE calls ADD COLUMN batch_id TEXT NOT NULL DEFAULT ''")


def _add_priority_column(conn: sqlite3.Connection) -> None:
    """A ledger written before priority classes: its calls were all interactive."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(calls)")}
    if "priority" not in columns:
        conn.execute("ALTER TABLE calls ADD COLUMN priority TEXT NOT NULL "
                     "DEFAULT 'interactive'")


def _add_tier_columns(conn: sqlite3.Connection) -> None:
    """A ledger written before tiered aliases: its calls had no tier."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(calls)")}
    for name, decl in _TIER_COLUMNS:
        if name not in columns:
            conn.execute(f"ALTER TABLE calls ADD COLUMN {name} {decl}")


_TIER_COLUMNS = (("tier", "TEXT NOT NULL DEFAULT ''"), ("score", "REAL"),
                 ("escalation", "TEXT NOT NULL DEFAULT ''"),
                 ("wasted", "TEXT NOT NULL DEFAULT ''"))


def _exists(conn: sqlite3.Connection, row: LedgerRow) -> bool:
    return conn.execute(
        "SELECT 1 FROM calls WHERE caller = ? AND ts = ? AND request_id = ? LIMIT 1",
        (row.caller, row.ts, row.request_id)).fetchone() is not None


def usage_sql(
    dialect: Dialect,
    since: float,
    until: float,
    group_by: Sequence[str],
    caller: str | None,
) -> tuple[list[str], str, list[object]]:
    """The grouped totals query: (group keys, SQL, parameters)."""
    if isinstance(group_by, str):
        raise ValueError("group_by must be a sequence of keys, not a string")
    unknown = [k for k in group_by if k not in GROUP_KEYS]
    if unknown:
        raise ValueError(
            f"cannot group by {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(GROUP_KEYS))})"
        )
    keys = list(dict.fromkeys(group_by))
    # Only these expressions are ever spliced into SQL; every value is a bound parameter.
    exprs = [dialect.day if k == "day" else "batch_id" if k == "batch" else k for k in keys]
    select = [f"{expr} AS {key}" for key, expr in zip(keys, exprs, strict=True)]
    select += [
        f"COALESCE(SUM(CASE WHEN wasted = '{BATCH_RERUN}' THEN 0 ELSE 1 END), 0)",
        "COALESCE(SUM(prompt_tokens), 0)",
        "COALESCE(SUM(completion_tokens), 0)",
        "COALESCE(SUM(cost_usd), 0.0)",
        "COALESCE(SUM(hosted_equiv_usd), 0.0)",
        "COALESCE(SUM(hosted_equiv_usd - cost_usd), 0.0)",
        dialect.errors,
    ]
    p = dialect.param
    sql = f"SELECT {', '.join(select)} FROM calls WHERE ts >= {p} AND ts < {p}"
    params: list[object] = [since, until]
    if caller is not None:
        sql += f" AND caller = {p}"
        params.append(caller)
    if keys:
        sql += f" GROUP BY {', '.join(exprs)} ORDER BY {', '.join(exprs)}"
    return keys, sql, params


def usage_totals(keys: list[str], records: Sequence[tuple[Any, ...]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for record in records:
        values = dict(zip(keys, record, strict=False))
        requests, prompt, completion, cost, equiv, saving, errors = record[len(keys):]
        if requests == 0 and not any(record[len(keys):]):
            # No GROUP BY: SQL answers one row of zeros for no calls. (A group of only
            # reruns' wasted rows has no request but spent: it stays.)
            continue
        values.update(
            requests=requests,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=cost,
            hosted_equiv_usd=equiv,
            saving_usd=saving,
            errors=errors,
        )
        out.append(values)
    return out


def resolve_waiters(outcomes: list[tuple[asyncio.Future[None], str | LedgerError | None]],
                    ) -> None:
    for done, error in outcomes:
        if done.done():
            continue  # the waiter was cancelled; its row is committed all the same
        if error is None:
            done.set_result(None)
        elif isinstance(error, LedgerError):
            done.set_exception(error)
        else:
            done.set_exception(LedgerError(f"ledger write failed: {error}"))


def committed(first: LedgerRow | None, exists: Callable[[LedgerRow], bool]) -> bool:
    """Whether a spooled batch is in the store already: its rows commit together, so its
    first row says (a caller, its start time to the microsecond and a request id)."""
    return first is not None and exists(first)
