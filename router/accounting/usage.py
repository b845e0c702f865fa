"""Usage reports from the ledger: one query, three shapes (JSON, CSV, a terminal table)."""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from router.accounting.budgets import day_start
from router.accounting.ledger import GROUP_KEYS, CallLedger
from router.errors import InvalidRequest

_METRICS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd",
            "hosted_equiv_usd", "saving_usd")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    since: float
    until: float
    group_by: tuple[str, ...]
    caller: str | None = None


def parse_time(value: str | None, default: float, name: str) -> float:
    """Unix seconds, or an ISO 8601 date / date-time (UTC unless it says otherwise)."""
    if value is None or not value.strip():
        return default
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise InvalidRequest(f"'{name}' must be a finite time", param=name)
        return seconds
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"'{name}' must be unix seconds or an ISO 8601 date",
                             param=name) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_group_by(value: str | None) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in (value or "caller").split(",") if k.strip())
    bad = [k for k in keys if k not in GROUP_KEYS]
    if bad:
        raise InvalidRequest(f"cannot group by {', '.join(bad)}; choose from "
                             f"{', '.join(sorted(GROUP_KEYS))}", param="group_by")
    return tuple(dict.fromkeys(keys))


def query(since: str | None, until: str | None, group_by: str | None,
          caller: str | None, now: float | None = None) -> UsageQuery:
    now = time.time() if now is None else now
    start = parse_time(since, day_start(now), "since")
    end = parse_time(until, now + 1, "until")
    if end <= start:
        raise InvalidRequest("'until' must be after 'since'", param="until")
    return UsageQuery(start, end, parse_group_by(group_by), caller)


def report(ledger: CallLedger, q: UsageQuery) -> list[dict[str, object]]:
    return ledger.usage(since=q.since, until=q.until, group_by=list(q.group_by),
                        caller=q.caller)


def totals(rows: Sequence[dict[str, object]]) -> dict[str, float]:
    out = dict.fromkeys(_METRICS, 0.0)
    for row in rows:
        for k in _METRICS:
            v = row.get(k)
            if isinstance(v, (int, float)):
                out[k] += v
    return out


def to_csv(rows: Sequence[dict[str, object]], group_by: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [*group_by, *_METRICS]
    w.writerow(cols)
    for row in rows:
        w.writerow([_cell(row.get(c, "")) for c in cols])
    return buf.getvalue()


# A text cell starting with one of these is read as a formula by spreadsheet programs
# (OWASP, CSV injection): a caller's name or a model name could run one on the reader's
# machine. Numbers are ours, and a negative one must stay a number.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    if not isinstance(value, str):
        return value
    if value.startswith(_FORMULA_START):
        value = "'" + value
    # The writer quotes a cell holding its line terminator ("\n") but not a bare CR, which
    # readers take for the end of the row: as LF the cell stays one quoted cell.
    return value.replace("\r", "\n") if "\r" in value else value


def to_table(rows: Sequence[dict[str, object]], group_by: Sequence[str]) -> str:
    cols = [*group_by, *_METRICS]
    cells = [[_fmt(row.get(c)) for c in cols] for row in rows]
    total = totals(rows)
    cells.append(["TOTAL", *[""] * (len(group_by) - 1), *(_fmt(total[k]) for k in _METRICS)]
                 if group_by else [_fmt(total[k]) for k in _METRICS])
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in cells:
        out.append("  ".join(v.rjust(w) if i >= len(group_by) else v.ljust(w)
                             for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6f}" if abs(v) < 1000 and v != int(v) else f"{v:.0f}"
    return "" if v is None else str(v)
