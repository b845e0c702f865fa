"""Usage reports from a PostgreSQL ledger (a fresh database of the session's cluster): the
report tests of tests/unit/test_usage.py run again here against it, and `spillover usage`
reading one."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from router.accounting.ledger import CallLedger
from router.accounting.ledger_pg import PgLedger
from router.accounting.pg import PgTarget
from router.cli import main
from tests.unit import test_usage as unit
from tests.unit.helpers import BASE_YAML
from tests.unit.test_usage import ledger_row, start_with_rows


@pytest.fixture(params=["postgresql"])
async def ledger(pg_url: str) -> AsyncIterator[CallLedger]:
    led = PgLedger(PgTarget.from_url(pg_url, "TEST_DB"))
    await start_with_rows(led)
    yield led
    await led.stop()


# The unit module's report tests, collected here with the `ledger` above.
test_report_by_caller = unit.test_report_by_caller
test_report_by_caller_and_alias_for_one_caller = unit.test_report_by_caller_and_alias_for_one_caller
test_report_by_day_over_a_window = unit.test_report_by_day_over_a_window
test_report_window_is_half_open = unit.test_report_window_is_half_open
test_report_empty_window_and_unknown_caller = unit.test_report_empty_window_and_unknown_caller
test_report_shapes_end_to_end = unit.test_report_shapes_end_to_end


# -- spillover usage, the command -----------------------------------------------------


def test_usage_command_reads_a_postgresql_ledger(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def fill() -> None:
        async with PgLedger(PgTarget.from_url(pg_url, "TEST_DB")) as led:
            await led.record(ledger_row("a1", ts=time.time()))
            await led.record(ledger_row("b1", ts=time.time(), caller="batch", route="local"))

    asyncio.run(fill())
    data = yaml.safe_load(BASE_YAML)
    data["server"]["database_url_env"] = "SPILLOVER_TEST_DB"
    cfg = tmp_path / "models.yaml"
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("SPILLOVER_TEST_DB", pg_url)
    assert main(["usage", "--config", str(cfg), "--group-by", "caller", "--csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["caller"], r["requests"]) for r in parsed] == [("app", "1"), ("batch", "1")]

    monkeypatch.setenv("SPILLOVER_TEST_DB", "")
    assert main(["usage", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "SPILLOVER_TEST_DB" in err and "not set or empty" in err
