"""Where the ledger and the budgets live, decided in one place: SQLite in this process by
default, PostgreSQL shared by every replica when `server.database_url_env` is set."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from router.accounting.budgets import Budgets, MemoryBudgetBook
from router.accounting.budgets_pg import PgBudgetBook
from router.accounting.ledger import MEMORY, CallLedger, Ledger
from router.accounting.ledger_pg import PgLedger
from router.accounting.ledger_spool import Spool, StoreHealth
from router.accounting.pg import PgConfigError, PgTarget
from router.config import Config, Server


def database_target(server: Server, env: Mapping[str, str]) -> PgTarget | None:
    """The PostgreSQL database configured, None for SQLite. A variable that is named but
    empty is an error: silently falling back would split the replicas' budgets."""
    name = server.database_url_env
    if name is None:
        return None
    url = env.get(name, "").strip()
    if not url:
        raise PgConfigError(
            f"server.database_url_env names {name}, which is not set or empty: set it to "
            "a postgresql:// URL, or remove database_url_env to use the SQLite ledger")
    return PgTarget.from_url(url, name)


def open_ledger(server: Server, env: Mapping[str, str]) -> CallLedger:
    target = database_target(server, env)
    spool = None
    if server.ledger_path != MEMORY or target is not None:
        # A ledger kept in memory only has nothing durable to fall back to.
        spool = Spool(server.ledger_spool_dir, server.ledger_spool_max_bytes)
    where = server.ledger_path if target is None else target.where
    health = StoreHealth(where, policy=server.ledger_failure, spool=spool,
                         retry_s=server.ledger_retry_s)
    if target is None:
        return Ledger(server.ledger_path, health=health)
    return PgLedger(target, health=health)


def budget_book(config: Config, ledger: CallLedger,
                clock: Callable[[], float] = time.time) -> Budgets:
    """The book that goes with the ledger: shared through PostgreSQL, or in this process."""
    budgets = {name: caller.budget for name, caller in config.callers.items()}
    if isinstance(ledger, PgLedger):
        # A hold outlives no request: every request ends within request_timeout_s.
        return PgBudgetBook(config.budget, budgets, ledger,
                            hold_ttl_s=config.server.request_timeout_s, clock=clock)
    return MemoryBudgetBook(config.budget, budgets, clock)
