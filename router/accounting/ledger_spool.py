"""What the ledger does when its store fails: the rows of answered calls are kept in a
spool on this replica and written to the store once it answers again.

The spool is a directory of append-only JSON-lines files, one line per batch the store
could not take, each line fsync'd before the calls it holds are answered, so the ledger's
promise (a row durable before the response finishes) holds through the outage. A line
carries the batch id its writer used: written to the store later, a batch is applied only
if neither its mark nor its first row is there already, so a batch whose COMMIT was lost
on the wire before the spooling is never applied twice.

`StoreHealth` keeps the state the operator sees (`/readyz`, `/status`, metrics) and says
when new calls must be refused: `server.ledger_failure: refuse`, or a spool that is full
or cannot be written. It logs one warning when a failure starts and one when it ends.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import orjson

log = logging.getLogger("spillover.ledger")

Policy = Literal["spool", "refuse"]
# New calls are refused once the spool is this full: the rest is headroom for the rows
# of calls already in flight, so that every call answered still finds room for its row.
HIGH_WATER = 0.9
# What a client is told to wait before trying again while new calls are refused.
RETRY_AFTER_S = 5
_SUFFIX = ".jsonl"
# A file is read whole when it is written back to the store: appends start a new one past
# this size, so draining holds at most this much of the spool in memory.
_FILE_MAX_BYTES = 4 * 1024 * 1024


class SpoolFull(OSError):
    """The spool holds its configured maximum: the batch was not kept."""


class Spool:
    """Append-only batches in `directory`, at most `max_bytes` in all. Thread-safe: the
    PostgreSQL ledger spools from its writer thread, the SQLite one from the loop."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._current: Path | None = None
        self._lock_fd: int | None = None
        self._seq = 0
        self.rows = 0
        self.bytes = 0
        # What an earlier run left behind is written to the store like anything else.
        if self.directory.is_dir():
            for path in self._files():
                self.bytes += path.stat().st_size
                self.rows += sum(_rows(items) for _, items in self.read(path))

    def _lock_directory(self) -> None:
        """Taken on first use and held for the process's life: two replicas draining one
        directory would delete each other's rows. Raises OSError when another holds it."""
        if self._lock_fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(f"the spool {self.directory} is in use by another process: give "
                          "each replica its own server.ledger_spool_dir") from None
        self._lock_fd = fd

    def close(self) -> None:
        with self._lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{_SUFFIX}"))

    def append(self, batch_id: str, items: list[list[Any]]) -> None:
        """Keep one batch durably (written and fsync'd) or raise OSError / SpoolFull."""
        line = orjson.dumps({"batch": batch_id, "items": items}) + b"\n"
        with self._lock:
            if self.bytes + len(line) > self.max_bytes:
                raise SpoolFull(f"the spool at {self.directory} is full "
                                f"({self.bytes} of {self.max_bytes} bytes)")
            self._lock_directory()
            if self._current is None:
                # Named by time and a counter: files drain oldest first.
                self._seq += 1
                self._current = self.directory / (
                    f"{time.time_ns():020d}-{os.getpid()}-{self._seq}{_SUFFIX}")
            fd = os.open(self._current, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"short write to {self._current}")
                os.fsync(fd)
            finally:
                os.close(fd)
            self.bytes += len(line)
            self.rows += _rows(items)
            if self._current.stat().st_size >= _FILE_MAX_BYTES:
                self._current = None

    @property
    def nearly_full(self) -> bool:
        return self.bytes >= self.max_bytes * HIGH_WATER

    def sealed(self) -> list[Path]:
        """Every file with batches in it, oldest first; appends go to a new file from now
        on, so what is being drained never grows under the reader."""
        with self._lock:
            self._current = None
            files = self._files() if self.directory.is_dir() else []
            if files:
                self._lock_directory()
            if not files:  # the files were removed by hand: nothing waits any more
                self.rows = self.bytes = 0
            return files

    @staticmethod
    def read(path: Path) -> Iterator[tuple[str, list[list[Any]]]]:
        with path.open("rb") as f:
            for line in f:
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    # A torn last line: its fsync never returned, so no call was answered
                    # on the strength of it.
                    continue
                yield str(entry["batch"]), list(entry["items"])

    def drained(self, path: Path, rows: int) -> None:
        """Every batch of `path` is in the store: the file goes."""
        with self._lock:
            size = path.stat().st_size
            path.unlink()
            self.bytes = max(0, self.bytes - size)
            self.rows = max(0, self.rows - rows)


class Drain:
    """Walks the spool oldest file first, a slice of batches at a time. A file goes once
    every slice of it is in the store; after a failure it starts over, and the batches of
    it already in are skipped by the store (their mark or first row is there)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._files: list[Path] = []
        self._path: Path | None = None
        self._batches: list[tuple[str, list[list[Any]]]] = []
        self._at = 0
        self._taken = 0

    @property
    def caught_up(self) -> bool:
        """Every file that was in the spool when this pass began is in the store."""
        return self._path is None and not self._files

    def take(self, max_items: int) -> list[tuple[str, list[list[Any]]]]:
        """The next slice (at least one batch, about `max_items` items); [] when the
        spool is empty."""
        while self._path is None or self._at >= len(self._batches):
            if self._path is not None:  # a file of torn lines only
                self.committed()
                continue
            if not self._files:
                self._files = self.spool.sealed()
                if not self._files:
                    return []
            self._path = self._files.pop(0)
            self._batches = list(self.spool.read(self._path))
            self._at = 0
        out: list[tuple[str, list[list[Any]]]] = []
        items = 0
        while self._at < len(self._batches) and (not out or items < max_items):
            batch = self._batches[self._at]
            out.append(batch)
            items += len(batch[1])
            self._at += 1
        self._taken = len(out)
        return out

    def committed(self) -> None:
        """The slice last taken is in the store."""
        if self._path is not None and self._at >= len(self._batches):
            path, self._path = self._path, None
            self.spool.drained(path, sum(_rows(items) for _, items in self._batches))
            self._batches = []

    def reset(self) -> None:
        """The slice last taken did not go in: its file starts over next time."""
        self._at = 0


class StoreHealth:
    """The store's state and the policy for a store that fails."""

    def __init__(self, where: str, *, policy: Policy = "spool", spool: Spool | None = None,
                 retry_s: float = 2.0, clock: Callable[[], float] = time.time) -> None:
        self.where = where
        self.policy = policy
        self.spool = spool
        self.retry_s = retry_s
        self._clock = clock
        self.failing_since: float | None = None
        self.error: str | None = None
        # Why the spool took nothing last time; None while it works (or is not needed).
        self.spool_error: str | None = None
        self.rows_spooled = 0  # since start, counters for the metrics
        self.rows_lost = 0
        self.refusals_dropped = 0  # rows of refused calls a nearly full spool did not keep
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    @property
    def pending(self) -> int:
        """Rows in the spool, waiting for the store."""
        return 0 if self.spool is None else self.spool.rows

    @property
    def backlog(self) -> bool:
        """Anything in the spool: rows, or only budget hold outcomes."""
        return self.spool is not None and self.spool.bytes > 0

    def failed(self, error: BaseException | str) -> None:
        self.error = first_line(error)
        if self.failing_since is None:
            self.failing_since = self._clock()
            self.failures += 1
            what = ("rows go to the spool at " + str(self.spool.directory)
                    if self.spool is not None else "rows cannot be kept (no spool)")
            if self.policy == "refuse":
                what += "; new calls are refused (server.ledger_failure: refuse)"
            log.warning("ledger store %s is failing (%s): %s", self.where, self.error, what)

    def recovered(self) -> None:
        if self.failing_since is None:
            return  # the hot path: every commit says so
        log.warning("ledger store %s answers again after %.1f s; %d spooled rows left to "
                    "write, %d rows lost", self.where, self._clock() - self.failing_since,
                    self.pending, self.rows_lost)
        self.failing_since = None
        self.error = None
        self.spool_error = None  # a full spool empties into the store from now on

    def keep(self, batch_id: str, items: list[list[Any]], rows: int,
             served: list[bool] | None = None) -> str | None:
        """Spool a batch the store could not take; None when kept, else why it was lost.
        `served`, per item: False for the row of a call refused before any upstream,
        which the headroom of a nearly full spool does not keep (nothing to bill)."""
        if self.spool is None:
            self.rows_lost += rows
            return "the ledger store failed and no spool is configured"
        if served is not None and self.spool.nearly_full:
            dropped = served.count(False)
            if dropped:
                self.refusals_dropped += dropped
                rows -= dropped
                items = [item for item, keep in zip(items, served, strict=True) if keep]
                if not items:
                    return None
        try:
            self.spool.append(batch_id, items)
        except OSError as exc:
            self.rows_lost += rows
            if self.spool_error is None:
                log.warning("ledger spool cannot keep rows (%s): new calls are refused until "
                            "the store answers", first_line(exc))
            self.spool_error = first_line(exc)
            return self.spool_error
        self.rows_spooled += rows
        self.spool_error = None
        return None

    def refusal(self) -> str | None:
        """Why new calls must be refused now, None while they may be served."""
        if not self.failing:
            return None
        if self.policy == "refuse":
            return (f"the call ledger ({self.where}) cannot be written since "
                    f"{_iso(self.failing_since)} and this gateway is set to refuse calls it "
                    "cannot bill (server.ledger_failure: refuse); retry later")
        spool = self.spool
        if self.spool_error is not None or spool is None or spool.nearly_full:
            why = self.spool_error or ("no spool" if spool is None else
                                       f"{spool.bytes} of {spool.max_bytes} bytes used")
            return (f"the call ledger ({self.where}) cannot be written and its spool cannot "
                    f"keep more rows ({why}); retry later")
        return None

    def snapshot(self) -> dict[str, object]:
        since = self.failing_since
        return {
            "state": "failing" if since is not None else "ok",
            "where": self.where,
            "policy": self.policy,
            "failing_since": since,
            "failing_for_s": None if since is None else round(self._clock() - since, 1),
            "error": self.error,
            "refusing": self.refusal() is not None,
            "spooled_rows": self.pending,
            "spool_bytes": 0 if self.spool is None else self.spool.bytes,
            "spool_max_bytes": None if self.spool is None else self.spool.max_bytes,
            "spool_error": self.spool_error,
            "rows_spooled_total": self.rows_spooled,
            "rows_lost_total": self.rows_lost,
            "refusals_dropped_total": self.refusals_dropped,
        }


def _rows(items: list[list[Any]]) -> int:
    """Ledger rows among a batch's items (["row", ...]; the others are budget holds')."""
    return sum(1 for item in items if item and item[0] == "row")


def first_line(error: BaseException | str) -> str:
    """An error for one log line or a status field: psycopg's messages span several."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _iso(ts: float | None) -> str:
    if ts is None:
        return "now"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
