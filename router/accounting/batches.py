"""Batch API storage: uploaded files on disk, batches and their lines in the ledger's database.

Files are copied to `data_dir` as they arrive and read back a line at a time: no file is held
in memory whole. A batch's lines are rows (custom_id, byte offset and length in the input
file, state, result). Every finished line is committed on its own, so a router killed in
the middle of a batch resumes from its database: finished lines are never run again, and
lines that were in flight (claimed, no result) go back to pending at the next start.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import psycopg

from router.accounting.ledger import BATCH_RERUN, StoreUnavailable
from router.accounting.pg import PgTarget
from router.accounting.pg import connect as pg_connect
from router.config import Batches, Config, Endpoint

# What a line may ask for, as OpenAI's Batch API spells it, and the gateway's endpoint.
BATCH_URLS: dict[str, Endpoint] = {"/v1/chat/completions": "chat",
                                   "/v1/embeddings": "embeddings"}
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_WINDOW = re.compile(r"(\d{1,7})([smh])")
_MAX_PROBLEMS = 20  # line problems reported at most (OpenAI reports a list too)
_CHUNK = 1 << 16
_PAGE = 1000  # lines read at a time when the result files are written

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS batch_files (
        id TEXT PRIMARY KEY, caller TEXT NOT NULL, purpose TEXT NOT NULL,
        filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
        lines INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY, caller TEXT NOT NULL, input_file_id TEXT NOT NULL,
        endpoint TEXT NOT NULL, completion_window TEXT NOT NULL, window_s REAL NOT NULL,
        metadata TEXT, status TEXT NOT NULL, errors TEXT,
        created_at REAL NOT NULL, in_progress_at REAL, finalizing_at REAL,
        completed_at REAL, failed_at REAL, expired_at REAL, cancelling_at REAL,
        cancelled_at REAL, output_file_id TEXT, error_file_id TEXT,
        total INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS batches_caller ON batches (caller, created_at)",
    "CREATE INDEX IF NOT EXISTS batches_status ON batches (status)",
    """CREATE TABLE IF NOT EXISTS batch_lines (
        batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL,
        offset_bytes INTEGER NOT NULL, length_bytes INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending', route TEXT NOT NULL DEFAULT '',
        status_code INTEGER, request_id TEXT, result TEXT, finished_at REAL,
        claimed_at REAL,
        PRIMARY KEY (batch_id, line_no)
    )""",
    "CREATE INDEX IF NOT EXISTS batch_lines_state ON batch_lines (batch_id, state, line_no)",
    # A hosted provider's own batch job holding some lines of a batch (La Plateforme's
    # Batch API): kept so a restarted router polls it again instead of resubmitting.
    # Status 'submitting': the intent, written before the create call, keyed by the
    # client-side token the job carries in its metadata (job_id holds the token until the
    # provider's id replaces it); a restart looks the job up by it and adopts it.
    """CREATE TABLE IF NOT EXISTS batch_jobs (
        job_id TEXT PRIMARY KEY, batch_id TEXT NOT NULL, backend TEXT NOT NULL,
        submitted_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'open'
    )""",
)


class BatchStoreError(RuntimeError):
    """The store refuses an operation; `code` says why in OpenAI's words."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


class FileTooLarge(BatchStoreError):
    pass


@dataclass(frozen=True, slots=True)
class LineProblem:
    line: int  # 1-based, as OpenAI reports them
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param,
                "line": self.line}


class BatchInputError(BatchStoreError):
    """A batch input file that cannot run: every problem with its line number."""

    def __init__(self, problems: list[LineProblem]) -> None:
        shown = "; ".join(f"line {p.line}: {p.message}" for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"the batch input file is invalid: {shown}{more}",
                         code="invalid_batch_file", param="file")
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Line:
    batch_id: str
    line_no: int
    custom_id: str
    offset: int
    length: int


def open_batch_store(config: Config, target: PgTarget | None) -> BatchStore:
    """In the ledger's database: SQLite beside it (files in a `batches` folder next to it),
    or the PostgreSQL database the replicas share (`target`; then `batches.data_dir` must
    be storage every replica sees)."""
    server, limits = config.server, config.batches
    ledger_dir = Path(server.ledger_path).parent if server.ledger_path != ":memory:" else None
    data_dir = Path(limits.data_dir) if limits.data_dir else (
        (ledger_dir or Path(".spillover")) / "batches")
    # A claimed line outlives no request: every request ends within request_timeout_s.
    return BatchStore(target if target is not None else server.ledger_path, data_dir, limits,
                      lease_s=server.request_timeout_s + 60)


def window_seconds(window: str) -> float | None:
    """'24h', '30m', '90s' -> seconds; None if it is no such duration (1 s to 7 days)."""
    m = _WINDOW.fullmatch(window)
    if m is None:
        return None
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    return float(seconds) if 1 <= seconds <= 7 * 86400 else None


JOB_TOKEN_PREFIX = "spillover-job-"


def new_job_token() -> str:
    return f"{JOB_TOKEN_PREFIX}{os.urandom(12).hex()}"


def is_job_token(job_id: str) -> bool:
    """Whether a stored job id is still the client-side token of a submission whose
    provider id was never stored (provider ids are UUIDs)."""
    return job_id.startswith(JOB_TOKEN_PREFIX)


def line_request_id(batch_id: str, line_no: int) -> str:
    """A line's request id, the same on every attempt: the ledger row of an attempt a
    restart repeats is found by it."""
    return f"{batch_id}-{line_no}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


class BatchStore:
    """Files, batches and lines. Synchronous and thread-safe: callers on the event loop
    run it through `asyncio.to_thread`."""

    def __init__(self, db: str | PgTarget, data_dir: str | os.PathLike[str], limits: Batches,
                 clock: Callable[[], float] = time.time, lease_s: float = 600.0) -> None:
        """`db`: a SQLite path (one router) or a PostgreSQL target (replicas sharing the
        batches; `data_dir` must then be storage they all see). `lease_s`: with
        PostgreSQL, how long a line may stay claimed before another replica takes it
        (its claimer died); set it above the request timeout."""
        self.limits = limits
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self.shared = isinstance(db, PgTarget)
        self._lease_s = lease_s
        self._db: Any
        self._target = db if isinstance(db, PgTarget) else None
        self._in_tx = False  # inside an explicit BEGIN on the current connection
        if isinstance(db, PgTarget):
            self._db = pg_connect(db, statement_timeout_ms=30_000, autocommit=True)
        else:
            if db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
            self._exec("PRAGMA busy_timeout = 5000")
            self._exec("PRAGMA journal_mode = WAL")
            # A finished line is committed before it counts as done; NORMAL survives kill -9.
            self._exec("PRAGMA synchronous = NORMAL")
        with self._lock:
            for statement in _SCHEMA:
                self._exec(statement)
            # Tables from before leases (claimed_at) get the column.
            if self.shared:
                self._exec("ALTER TABLE batch_lines ADD COLUMN IF NOT EXISTS claimed_at REAL")
            elif "claimed_at" not in {r[1] for r in self._exec(
                    "PRAGMA table_info(batch_lines)").fetchall()}:
                self._exec("ALTER TABLE batch_lines ADD COLUMN claimed_at REAL")
            # Lines sent in a hosted batch job name it (tables from before jobs get it).
            if self.shared:
                self._exec("ALTER TABLE batch_lines ADD COLUMN IF NOT EXISTS job_id TEXT")
            elif "job_id" not in {r[1] for r in self._exec(
                    "PRAGMA table_info(batch_lines)").fetchall()}:
                self._exec("ALTER TABLE batch_lines ADD COLUMN job_id TEXT")

    def _ledger_here(self) -> bool:
        """Whether the ledger's rows live in this database too (unless the ledger is
        elsewhere); the caller holds the lock."""
        return bool(self._exec(
            "SELECT 1 FROM information_schema.tables WHERE table_name = 'calls'"
            if self.shared else
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'calls'",
        ).fetchall())

    def _sql(self, sql: str) -> str:
        """The statements are written for SQLite; PostgreSQL spells a few things apart."""
        if not self.shared:
            return sql
        sql = sql.replace("?", "%s").replace(" REAL", " DOUBLE PRECISION")
        sql = sql.replace(" INTEGER", " BIGINT").replace("@SKIP_LOCKED", " FOR UPDATE SKIP LOCKED")
        return sql

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """One statement (the caller holds the lock): a cursor. With PostgreSQL, a
        connection the server dropped (a restart, a failover) is replaced before the next
        transaction or lone statement, never in the middle of one; while the server does
        not answer, StoreUnavailable."""
        if self._target is None:
            return self._db.execute(self._sql(sql).replace("@SKIP_LOCKED", ""), params)
        if sql == "ROLLBACK" and self._db.broken:
            self._in_tx = False
            return None  # the server ended that transaction with the connection
        with self._pg_errors():
            if self._db.broken or self._db.closed:
                if self._in_tx:  # a COMMIT included: what it would commit is gone
                    self._in_tx = False
                    raise StoreUnavailable("batch store: the connection was lost mid-way "
                                           "through a transaction")
                self._db = pg_connect(self._target, statement_timeout_ms=30_000,
                                      autocommit=True)
            cur = self._db.execute(self._sql(sql), params)
        if sql == "BEGIN":
            self._in_tx = True
        elif sql in ("COMMIT", "ROLLBACK"):
            self._in_tx = False
        return cur

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """One statement for many rows, inside the caller's transaction."""
        with self._pg_errors():
            cur = self._db.cursor()
            cur.executemany(self._sql(sql), rows)
            cur.close()

    @contextlib.contextmanager
    def _pg_errors(self) -> Iterator[None]:
        try:
            yield
        except ConnectionError as exc:  # pg_connect: the server does not answer
            raise StoreUnavailable(f"batch store: {exc}") from None
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"batch store: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._exec(sql, params).fetchall())

    # -- files -----------------------------------------------------------------------

    def path(self, file_id: str) -> Path:
        return self.data_dir / f"{file_id}.jsonl"

    def save_file(self, caller: str, filename: str, purpose: str,
                  src: IO[bytes]) -> dict[str, Any]:
        """Copy `src` to the data directory a chunk at a time, bounded by max_file_bytes;
        a batch input file is checked line by line (BatchInputError with line numbers)."""
        file_id = new_id("file")
        dest = self.path(file_id)
        size = 0
        try:
            with dest.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    size += len(chunk)
                    if size > self.limits.max_file_bytes:
                        raise FileTooLarge(
                            f"the file is over the {self.limits.max_file_bytes} bytes a file "
                            "may have (batches.max_file_bytes)", code="file_too_large",
                            param="file")
                    out.write(chunk)
            lines = 0
            if purpose == "batch":
                lines = self.check_file(dest)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        now = int(self._clock())
        with self._lock:
            self._exec(
                "INSERT INTO batch_files (id, caller, purpose, filename, bytes, created_at, "
                "lines) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (file_id, caller, purpose, filename[:255], size, now, lines))
        return file_object(file_id, purpose, filename[:255], size, now)

    def _register_file(self, file_id: str, caller: str, filename: str, size: int) -> None:
        with self._lock:
            self._exec(
                "INSERT INTO batch_files (id, caller, purpose, filename, bytes, created_at) "
                "VALUES (?, ?, 'batch_output', ?, ?, ?)",
                (file_id, caller, filename, size, int(self._clock())))

    def get_file(self, caller: str, file_id: str) -> dict[str, Any] | None:
        """The file object, if `caller` owns it (another caller's file is not there)."""
        rows = self._rows("SELECT purpose, filename, bytes, created_at FROM batch_files "
                          "WHERE id = ? AND caller = ? AND deleted = 0", (file_id, caller))
        if not rows:
            return None
        purpose, filename, size, created = rows[0]
        return file_object(file_id, purpose, filename, size, created)

    def list_files(self, caller: str, purpose: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT id, purpose, filename, bytes, created_at FROM batch_files "
               "WHERE caller = ? AND deleted = 0")
        params: tuple[Any, ...] = (caller,)
        if purpose is not None:
            sql += " AND purpose = ?"
            params += (purpose,)
        return [file_object(*r) for r in self._rows(sql + " ORDER BY created_at DESC", params)]

    def delete_file(self, caller: str, file_id: str) -> bool:
        with self._lock:
            cur = self._exec("UPDATE batch_files SET deleted = 1 WHERE id = ? AND "
                                   "caller = ? AND deleted = 0", (file_id, caller))
        # A running batch still reads its input: the bytes go once no batch needs them.
        if cur.rowcount and not self._rows(
                "SELECT 1 FROM batches WHERE input_file_id = ? AND status "
                "NOT IN ('completed', 'failed', 'expired', 'cancelled')", (file_id,)):
            self.path(file_id).unlink(missing_ok=True)
        return bool(cur.rowcount)

    def check_file(self, path: Path) -> int:
        """The lines of a batch input file, or BatchInputError naming each bad line."""
        problems: list[LineProblem] = []
        count = 0
        for _ in self._scan(path, problems):
            count += 1
        if count == 0 and not problems:
            problems.append(LineProblem(1, "empty_file", "the file has no request lines"))
        if problems:
            raise BatchInputError(problems)
        return count

    def _scan(self, path: Path,
              problems: list[LineProblem]) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        """(line number, offset, length, the parsed line) of each well-formed line; the
        problems of the others go to `problems`."""
        seen: dict[str, int] = {}
        limit = self.limits.max_line_bytes
        offset = 0
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if len(problems) >= _MAX_PROBLEMS:
                    return
                if not raw.strip():
                    continue  # a blank line (a trailing newline) is no request
                if number > self.limits.max_lines:
                    problems.append(LineProblem(number, "too_many_lines",
                                                f"a batch may have at most "
                                                f"{self.limits.max_lines} lines"))
                    return
                if len(raw) > limit:
                    problems.append(LineProblem(number, "request_too_large",
                                                f"the line is over the {limit} bytes a "
                                                "request may have", "body"))
                    continue
                try:
                    item = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    problems.append(LineProblem(number, "invalid_json",
                                                "the line is not valid JSON"))
                    continue
                why = _line_problem(item)
                if why is not None:
                    problems.append(LineProblem(number, why[0], why[1], why[2]))
                    continue
                cid = item["custom_id"]
                if cid in seen:
                    problems.append(LineProblem(
                        number, "duplicate_custom_id",
                        f"custom_id {cid[:64]!r} is already used on line {seen[cid]}",
                        "custom_id"))
                    continue
                seen[cid] = number
                yield number, start, len(raw), item

    def read_line(self, file_id: str, line: Line) -> dict[str, Any]:
        with self.path(file_id).open("rb") as f:
            f.seek(line.offset)
            item: dict[str, Any] = orjson.loads(f.read(line.length))
        return item

    # -- batches ---------------------------------------------------------------------

    def create_batch(self, caller: str, input_file_id: str, endpoint: str, window: str,
                     metadata: dict[str, str] | None,
                     check: Callable[[dict[str, Any]], tuple[str, str] | None],
                     ) -> dict[str, Any]:
        """A new batch of the file's lines; `check(body)` says why a line's body may not
        run for this caller ((code, message), or None). A line for another endpoint or a
        refused body fails the batch at once with the line numbers, as OpenAI does."""
        window_s = window_seconds(window)
        if window_s is None:
            raise BatchStoreError("completion_window must be a duration such as '24h', "
                                  "'30m' or '90s' (at most 7 days)",
                                  code="invalid_completion_window", param="completion_window")
        if endpoint not in BATCH_URLS:
            raise BatchStoreError(f"endpoint must be one of {', '.join(sorted(BATCH_URLS))}",
                                  code="invalid_endpoint", param="endpoint")
        rows = self._rows("SELECT purpose FROM batch_files WHERE id = ? AND caller = ? AND "
                          "deleted = 0", (input_file_id, caller))
        if not rows:
            raise BatchStoreError(f"no file {input_file_id[:80]!r}", code="file_not_found",
                                  param="input_file_id")
        if rows[0][0] != "batch":
            raise BatchStoreError("the input file was not uploaded with purpose 'batch'",
                                  code="invalid_file_purpose", param="input_file_id")
        problems: list[LineProblem] = []
        lines: list[tuple[int, str, int, int]] = []
        for number, offset, length, item in self._scan(self.path(input_file_id), problems):
            if item["url"] != endpoint:
                problems.append(LineProblem(
                    number, "invalid_url", f"the line is for {item['url'][:64]!r}, the batch "
                    f"for {endpoint}", "url"))
                continue
            why = check(item["body"])
            if why is not None:
                problems.append(LineProblem(number, why[0], why[1], "body"))
                continue
            lines.append((number, item["custom_id"], offset, length))
        batch_id = new_id("batch")
        now = self._clock()
        status = "failed" if problems else "validating"
        errors = (orjson.dumps({"object": "list", "data": [p.as_dict() for p in problems]})
                  .decode() if problems else None)
        with self._lock:
            self._exec("BEGIN" if self.shared else "BEGIN IMMEDIATE")
            try:
                self._exec(
                    "INSERT INTO batches (id, caller, input_file_id, endpoint, "
                    "completion_window, window_s, metadata, status, errors, created_at, "
                    "failed_at, total) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (batch_id, caller, input_file_id, endpoint, window, window_s,
                     orjson.dumps(metadata).decode() if metadata else None, status, errors,
                     now, now if problems else None, 0 if problems else len(lines)))
                if not problems:
                    self._many(
                        "INSERT INTO batch_lines (batch_id, line_no, custom_id, offset_bytes, "
                        "length_bytes) VALUES (?, ?, ?, ?, ?)",
                        [(batch_id, *line) for line in lines])
                self._exec("COMMIT")
            except BaseException:
                self._exec("ROLLBACK")
                raise
        out = self.get_batch(caller, batch_id)
        assert out is not None
        return out

    def get_batch(self, caller: str | None, batch_id: str) -> dict[str, Any] | None:
        sql = f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?"
        params: tuple[Any, ...] = (batch_id,)
        if caller is not None:
            sql += " AND caller = ?"
            params += (caller,)
        rows = self._rows(sql, params)
        return self._batch_object(rows[0]) if rows else None

    def list_batches(self, caller: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        sql = f"SELECT {_BATCH_COLUMNS} FROM batches WHERE caller = ?"
        params: tuple[Any, ...] = (caller,)
        if after is not None:
            sql += (" AND (created_at, id) < (SELECT created_at, id FROM batches "
                    "WHERE id = ? AND caller = ?)")
            params += (after, caller)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return [self._batch_object(r) for r in self._rows(sql, (*params, limit))]

    def caller_of(self, batch_id: str) -> str | None:
        rows = self._rows("SELECT caller FROM batches WHERE id = ?", (batch_id,))
        return rows[0][0] if rows else None

    def counts(self, batch_id: str) -> dict[str, int]:
        rows = self._rows("SELECT state, COUNT(*) FROM batch_lines WHERE batch_id = ? "
                          "GROUP BY state", (batch_id,))
        by = dict(rows)
        return {"total": sum(by.values()), "completed": by.get("done", 0),
                "failed": by.get("failed", 0), "pending": by.get("pending", 0),
                "running": by.get("running", 0)}

    def _batch_object(self, r: tuple[Any, ...]) -> dict[str, Any]:
        (bid, _caller, input_file, endpoint, window, _window_s, metadata, status, errors,
         created, in_progress, finalizing, completed, failed, expired, cancelling,
         cancelled, output_file, error_file, total) = r
        c = self.counts(bid)

        def ts(x: float | None) -> int | None:
            return None if x is None else int(x)

        return {
            "id": bid, "object": "batch", "endpoint": endpoint,
            "errors": None if errors is None else orjson.loads(errors),
            "input_file_id": input_file, "completion_window": window, "status": status,
            "output_file_id": output_file, "error_file_id": error_file,
            "created_at": int(created), "in_progress_at": ts(in_progress),
            "expires_at": int(created + _window_s), "finalizing_at": ts(finalizing),
            "completed_at": ts(completed), "failed_at": ts(failed),
            "expired_at": ts(expired), "cancelling_at": ts(cancelling),
            "cancelled_at": ts(cancelled),
            "request_counts": {"total": total, "completed": c["completed"],
                               "failed": c["failed"]},
            "metadata": None if metadata is None else orjson.loads(metadata),
        }

    def active(self) -> list[tuple[str, str, str, str, float, float]]:
        """Batches the scheduler works on: (id, caller, status, endpoint, created_at,
        window_s), oldest first."""
        return [tuple(r) for r in self._rows(  # type: ignore[misc, unused-ignore]
            "SELECT id, caller, status, endpoint, created_at, window_s FROM batches WHERE "
            "status IN ('validating', 'in_progress', 'cancelling') ORDER BY created_at")]

    def input_file(self, batch_id: str) -> str:
        return str(self._rows("SELECT input_file_id FROM batches WHERE id = ?",
                              (batch_id,))[0][0])

    def set_status(self, batch_id: str, status: str, *, only_from: tuple[str, ...] = ()) -> bool:
        column = {"in_progress": "in_progress_at", "finalizing": "finalizing_at",
                  "cancelling": "cancelling_at"}[status]
        sql = f"UPDATE batches SET status = ?, {column} = ? WHERE id = ?"
        params: tuple[Any, ...] = (status, self._clock(), batch_id)
        if only_from:
            sql += f" AND status IN ({', '.join('?' for _ in only_from)})"
            params += only_from
        with self._lock:
            return bool(self._exec(sql, params).rowcount)

    def cancel(self, caller: str, batch_id: str) -> dict[str, Any] | None:
        """Stop feeding new lines; the scheduler lets in-flight ones finish, then ends it."""
        if self.get_batch(caller, batch_id) is None:
            return None
        self.set_status(batch_id, "cancelling", only_from=("validating", "in_progress"))
        return self.get_batch(caller, batch_id)

    # -- lines -----------------------------------------------------------------------

    def recover(self) -> int:
        """Lines a killed router had in flight have no result: run them again. Finished
        lines keep theirs and are never run twice. SQLite (one router): every running line,
        at start. PostgreSQL (replicas): the lines claimed longer than the lease ago.
        Lines inside a hosted batch job are not in flight here: the job is polled again.

        A line's ledger row may have been committed before the kill while its result was
        not: that attempt really ran (a hosted one was billed), so its row stays, with its
        cost, marked `wasted = 'batch-rerun'` in the same transaction as the reset; usage
        counts the line's request once (the rerun's row, its request id is the line's, see
        `line_request_id`) and its spend in full. The ledger must share this database for
        that (it does unless server.ledger_path points elsewhere)."""
        where = "state = 'running' AND job_id IS NULL"
        params: tuple[Any, ...] = ()
        if self.shared:
            where += " AND claimed_at < ?"
            params = (self._clock() - self._lease_s,)
        with self._lock:
            self._exec("BEGIN" if self.shared else "BEGIN IMMEDIATE")
            try:
                if self._ledger_here():
                    self._exec(
                        f"UPDATE calls SET wasted = '{BATCH_RERUN}' WHERE batch_id <> '' AND "
                        "wasted = '' AND request_id IN (SELECT batch_id || '-' || line_no "
                        f"FROM batch_lines WHERE {where})", params)
                n = int(self._exec(f"UPDATE batch_lines SET state = 'pending' WHERE {where}",
                                   params).rowcount)
                self._exec("COMMIT")
            except BaseException:
                self._exec("ROLLBACK")
                raise
        return n

    def booked(self, lines: list[Line]) -> set[int]:
        """Line numbers among `lines` that already have a ledger row (not a rerun's wasted
        one): a hosted job's lines whose rows were written, but not their results, when the
        router stopped. The job was billed once: booking it again would count it twice, and
        deleting the row would erase spend that happened, so the row stays as it is."""
        if not lines:
            return set()
        with self._lock:
            if not self._ledger_here():
                return set()
            return {ln.line_no for ln in lines if self._exec(
                "SELECT 1 FROM calls WHERE batch_id = ? AND request_id = ? AND wasted = '' "
                "LIMIT 1", (ln.batch_id, line_request_id(ln.batch_id, ln.line_no))).fetchone()}

    # -- hosted batch jobs -----------------------------------------------------------

    def add_job(self, batch_id: str, job_id: str, backend: str, lines: list[Line], *,
                status: str = "open") -> None:
        """The job and the lines it holds, in one transaction."""
        with self._lock:
            self._exec("BEGIN" if self.shared else "BEGIN IMMEDIATE")
            try:
                self._exec("INSERT INTO batch_jobs (job_id, batch_id, backend, submitted_at, "
                           "status) VALUES (?, ?, ?, ?, ?)",
                           (job_id, batch_id, backend, self._clock(), status))
                self._many(
                    "UPDATE batch_lines SET job_id = ? WHERE batch_id = ? AND line_no = ?",
                    [(job_id, batch_id, ln.line_no) for ln in lines])
                self._exec("COMMIT")
            except BaseException:
                self._exec("ROLLBACK")
                raise

    def intend_job(self, batch_id: str, token: str, backend: str, lines: list[Line]) -> None:
        """Before a job is created: its token and the lines it will hold, in one
        transaction. The lines are the token's from now on (recover() leaves them alone),
        so a router killed after the create call finds the job by its token and adopts it
        instead of sending the lines again."""
        self.add_job(batch_id, token, backend, lines, status="submitting")

    def job_created(self, token: str, job_id: str) -> None:
        """The provider's id for the job submitted with `token` (created, or found again)."""
        with self._lock:
            self._exec("BEGIN" if self.shared else "BEGIN IMMEDIATE")
            try:
                self._exec("UPDATE batch_jobs SET job_id = ?, status = 'open' WHERE "
                           "job_id = ? AND status = 'submitting'", (job_id, token))
                self._exec("UPDATE batch_lines SET job_id = ? WHERE job_id = ?",
                           (job_id, token))
                self._exec("COMMIT")
            except BaseException:
                self._exec("ROLLBACK")
                raise

    def open_jobs(self, batch_id: str) -> list[tuple[str, str, float]]:
        """(job id, backend, submitted_at) of the batch's jobs not yet ended; the id of a
        job whose create call was never answered is still its token (is_job_token)."""
        return [(str(a), str(b), float(c)) for a, b, c in self._rows(
            "SELECT job_id, backend, submitted_at FROM batch_jobs WHERE batch_id = ? AND "
            "status IN ('open', 'submitting') ORDER BY submitted_at", (batch_id,))]

    def job_lines(self, job_id: str) -> list[Line]:
        """The job's lines still without a result."""
        return [Line(*r) for r in self._rows(
            "SELECT batch_id, line_no, custom_id, offset_bytes, length_bytes FROM batch_lines "
            "WHERE job_id = ? AND state = 'running' ORDER BY line_no", (job_id,))]

    def end_job(self, job_id: str, status: str) -> None:
        """The job is over: its lines without a result go back to pending (run again or
        reported as never run by the batch's end)."""
        with self._lock:
            self._exec("UPDATE batch_lines SET state = 'pending', route = '', job_id = NULL "
                       "WHERE job_id = ? AND state = 'running'", (job_id,))
            self._exec("UPDATE batch_jobs SET status = ? WHERE job_id = ?", (status, job_id))

    def claim(self, batch_id: str, n: int, route: str) -> list[Line]:
        """Up to `n` pending lines, marked running (one transaction: two schedulers on the
        same database never take the same line)."""
        if n <= 0:
            return []
        with self._lock:
            # The state is checked again by the UPDATE itself, and PostgreSQL skips rows
            # another replica is claiming: no line is ever claimed twice.
            # A materialised CTE: as a plain IN subquery PostgreSQL may evaluate the
            # LIMIT more than once and claim more lines than asked (seen: 4 for 3).
            rows = self._exec(
                "WITH picked AS MATERIALIZED (SELECT line_no FROM batch_lines WHERE "
                "batch_id = ? AND state = 'pending' ORDER BY line_no LIMIT ?@SKIP_LOCKED) "
                "UPDATE batch_lines SET state = 'running', route = ?, claimed_at = ? WHERE "
                "batch_id = ? AND state = 'pending' AND line_no IN (SELECT line_no FROM "
                "picked) RETURNING line_no, custom_id, offset_bytes, length_bytes",
                (batch_id, n, route, self._clock(), batch_id)).fetchall()
        return sorted((Line(batch_id, *r) for r in rows), key=lambda x: x.line_no)

    def finish_line(self, line: Line, *, ok: bool, status_code: int | None,
                    request_id: str, result: bytes, route: str) -> None:
        """Commit one line's outcome; a line already finished keeps its first one."""
        with self._lock:
            self._exec(
                "UPDATE batch_lines SET state = ?, status_code = ?, request_id = ?, "
                "result = ?, route = ?, finished_at = ? WHERE batch_id = ? AND line_no = ? "
                "AND state = 'running'",
                ("done" if ok else "failed", status_code, request_id, result.decode(),
                 route, self._clock(), line.batch_id, line.line_no))

    def first_line(self, batch_id: str) -> Line | None:
        rows = self._rows("SELECT line_no, custom_id, offset_bytes, length_bytes FROM "
                          "batch_lines WHERE batch_id = ? ORDER BY line_no LIMIT 1",
                          (batch_id,))
        return Line(batch_id, *rows[0]) if rows else None

    def release(self, line: Line) -> None:
        """A claimed line not run after all (the router stops): pending again."""
        with self._lock:
            self._exec("UPDATE batch_lines SET state = 'pending', route = '' WHERE "
                             "batch_id = ? AND line_no = ? AND state = 'running'",
                             (line.batch_id, line.line_no))

    def finalize(self, batch_id: str, status: str) -> None:
        """Write the output and error files and end the batch as `status` (completed,
        expired or cancelled). Lines that never ran land in the error file as OpenAI
        reports them (batch_expired, batch_cancelled). Written a page of lines at a time:
        a large batch's results are never in memory whole."""
        caller = self.caller_of(batch_id)
        assert caller is not None
        if not self.set_status(batch_id, "finalizing",
                               only_from=("validating", "in_progress", "cancelling")):
            return  # another replica is finalizing it
        never = {"expired": ("batch_expired", "This request could not be executed before "
                             "the completion window expired."),
                 "cancelled": ("batch_cancelled", "This request was not executed because "
                               "the batch was cancelled.")}.get(status)
        ids = {"out": new_id("file"), "err": new_id("file")}
        sizes = {"out": 0, "err": 0}
        with self.path(ids["out"]).open("wb") as out, self.path(ids["err"]).open("wb") as err:
            files = {"out": out, "err": err}
            last = 0
            while page := self._rows(
                    "SELECT line_no, custom_id, state, status_code, request_id, result FROM "
                    "batch_lines WHERE batch_id = ? AND line_no > ? ORDER BY line_no "
                    "LIMIT ?", (batch_id, last, _PAGE)):
                for line_no, cid, state, code, rid, result in page:
                    item: dict[str, Any] = {"id": f"batch_req_{batch_id[6:]}_{line_no}",
                                            "custom_id": cid}
                    if state in ("done", "failed"):
                        item["response"] = {"status_code": code, "request_id": rid,
                                            "body": orjson.loads(result)}
                        item["error"] = None
                        which = "out" if state == "done" else "err"
                    elif never is not None:
                        item["response"] = None
                        item["error"] = {"code": never[0], "message": never[1]}
                        which = "err"
                    else:
                        continue
                    data = jsonl_line(item)
                    files[which].write(data)
                    sizes[which] += len(data)
                last = page[-1][0]
        kept: dict[str, str | None] = {}
        for which, suffix in (("out", "output"), ("err", "error")):
            if sizes[which]:
                self._register_file(ids[which], caller, f"{batch_id}_{suffix}.jsonl",
                                    sizes[which])
                kept[which] = ids[which]
            else:
                self.path(ids[which]).unlink(missing_ok=True)
                kept[which] = None
        column = {"completed": "completed_at", "expired": "expired_at",
                  "cancelled": "cancelled_at"}[status]
        with self._lock:
            self._exec(
                f"UPDATE batches SET status = ?, {column} = ?, output_file_id = ?, "
                "error_file_id = ? WHERE id = ?",
                (status, self._clock(), kept["out"], kept["err"], batch_id))


_BATCH_COLUMNS = ("id, caller, input_file_id, endpoint, completion_window, window_s, metadata, "
                  "status, errors, created_at, in_progress_at, finalizing_at, completed_at, "
                  "failed_at, expired_at, cancelling_at, cancelled_at, output_file_id, "
                  "error_file_id, total")


def file_object(file_id: str, purpose: str, filename: str, size: int,
                created: int) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": created,
            "filename": filename, "purpose": purpose, "status": "processed",
            "status_details": None, "expires_at": None}


def _line_problem(item: object) -> tuple[str, str, str | None] | None:
    if not isinstance(item, dict):
        return "invalid_request", "the line is not a JSON object", None
    cid = item.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return "missing_custom_id", "the line has no custom_id (a non-empty string)", \
            "custom_id"
    if item.get("method") != "POST":
        return "invalid_method", "method must be POST", "method"
    url = item.get("url")
    if url not in BATCH_URLS:
        return ("invalid_url", f"url must be one of {', '.join(sorted(BATCH_URLS))}", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return "invalid_body", "body must be a JSON object", "body"
    if not isinstance(body.get("model"), str):
        return "missing_model", "body.model must name a model", "body.model"
    if body.get("stream") is True:
        return "invalid_body", "a batch request cannot stream", "body.stream"
    return None


# The characters besides \n that str.splitlines() (and readers built on it) split on and
# that JSON leaves unescaped inside strings; a model's text may hold any of them.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"),
                (b"\xe2\x80\xa9", b"\\u2029"))


def jsonl_line(item: Any) -> bytes:
    """One JSONL line that splits as one line however it is read: the line breaks JSON
    may carry raw inside strings are escaped (in UTF-8 these bytes are those characters
    only, so nothing else changes)."""
    data = orjson.dumps(item)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data + b"\n"
