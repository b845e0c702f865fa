"""PostgreSQL plumbing shared by the ledger and the budgets: where the database is, how to
connect with bounded waits, and the schema, created once however many replicas start.

The URL holds a password, so it is read from the environment variable that models.yaml
names, and only `PgTarget.where` (host, port, database) is ever logged or shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import conninfo_to_dict

log = logging.getLogger("spillover.pg")

CONNECT_TIMEOUT_S = 5
# Every statement has a bound: a stuck database must fail a request, never hang it.
WRITE_STATEMENT_TIMEOUT_MS = 10_000
RESERVE_STATEMENT_TIMEOUT_MS = 3_000
READ_STATEMENT_TIMEOUT_MS = 30_000  # usage reports scan a month of rows

# Any fixed 64-bit numbers: the keys of the advisory locks that serialise schema creation
# and budget reservations across every replica sharing the database.
SCHEMA_LOCK = 0x5370_696C_6C00_0001
BUDGET_LOCK = 0x5370_696C_6C00_0002


class PgConfigError(ValueError):
    """The database URL is missing or malformed (the message never contains it)."""


@dataclass(frozen=True)
class PgTarget:
    url: str = field(repr=False)
    where: str  # postgresql://host:port/dbname: safe to log

    @classmethod
    def from_url(cls, url: str, source: str) -> PgTarget:
        if not url.startswith(("postgresql://", "postgres://")):
            raise PgConfigError(f"{source} must hold a postgresql:// URL")
        try:
            parts = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            # psycopg's message may quote the URL, password included: do not pass it on.
            raise PgConfigError(f"{source} does not hold a valid postgresql:// URL") from None
        host = str(parts.get("host") or "localhost")
        port = str(parts.get("port") or 5432)
        dbname = str(parts.get("dbname") or parts.get("user") or "")
        return cls(url, f"postgresql://{host}:{port}/{dbname}")


def connect(target: PgTarget, *, statement_timeout_ms: int,
            autocommit: bool = False) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(
            target.url,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT_S,
            options=f"-c statement_timeout={statement_timeout_ms}",
            application_name="spillover",
        )
    except psycopg.Error as exc:
        # Server messages name the user and host at most; never the password.
        raise ConnectionError(f"cannot connect to {target.where}: {exc}") from None


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS calls (
        id BIGSERIAL PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        request_id TEXT NOT NULL,
        caller TEXT NOT NULL,
        alias TEXT NOT NULL,
        route TEXT NOT NULL,
        backend TEXT NOT NULL,
        model_id TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        hosted_equiv_usd DOUBLE PRECISION NOT NULL,
        latency_s DOUBLE PRECISION NOT NULL,
        ttft_s DOUBLE PRECISION,
        status INTEGER NOT NULL,
        reason TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        batch_id TEXT NOT NULL DEFAULT '',
        priority TEXT NOT NULL DEFAULT 'interactive',
        tier TEXT NOT NULL DEFAULT '',
        score DOUBLE PRECISION,
        escalation TEXT NOT NULL DEFAULT '',
        wasted TEXT NOT NULL DEFAULT ''
    )""",
    # A ledger created before the Batch API gets the column (PostgreSQL >= 9.6).
    "ALTER TABLE calls ADD COLUMN IF NOT EXISTS batch_id TEXT NOT NULL DEFAULT ''",
    # And before priority classes: its calls were all interactive.
    "ALTER TABLE calls ADD COLUMN IF NOT EXISTS priority TEXT NOT NULL "
    "DEFAULT 'interactive'",
    # And before tiered aliases.
    "ALTER TABLE calls ADD COLUMN IF NOT EXISTS tier TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE calls ADD COLUMN IF NOT EXISTS score DOUBLE PRECISION",
    "ALTER TABLE calls ADD COLUMN IF NOT EXISTS escalation TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE calls ADD COLUMN IF NOT EXISTS wasted TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts)",
    "CREATE INDEX IF NOT EXISTS calls_caller_ts ON calls (caller, ts)",
    # Money held for hosted calls in flight, by every replica. A replica that dies leaves
    # its holds behind; they stop counting at expires_at (the request deadline).
    """CREATE TABLE IF NOT EXISTS budget_holds (
        id BIGSERIAL PRIMARY KEY,
        caller TEXT NOT NULL,
        amount_usd DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS budget_holds_caller ON budget_holds (caller, expires_at)",
    "CREATE INDEX IF NOT EXISTS budget_holds_expires ON budget_holds (expires_at)",
    # Settled hosted spend per scope (see scope_of) and window, kept by
    # the ledger writer so a reservation reads two rows per scope instead of a month of calls.
    # One row per committed writer transaction: after a connection is lost during COMMIT,
    # the writer looks its batch up here before retrying, so a batch the server did commit
    # is never applied twice (no duplicate rows, no spend counted twice).
    """CREATE TABLE IF NOT EXISTS ledger_batches (
        id TEXT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ledger_batches_at ON ledger_batches (at)",
    """CREATE TABLE IF NOT EXISTS budget_spend (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        start DOUBLE PRECISION NOT NULL,
        spent DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scope, period, start)
    )""",
)
GLOBAL_SCOPE = "global"


def scope_of(caller: str) -> str:
    """A prefix, so that no caller name can collide with the global scope."""
    return f"caller:{caller}"


def ensure_schema(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Idempotent; the lock makes two replicas starting at once take turns, since
    concurrent CREATE ... IF NOT EXISTS can still collide on the catalog."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        for statement in SCHEMA:
            conn.execute(statement)
