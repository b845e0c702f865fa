"""The Batch API end to end: the openai SDK's files and batches clients against a served
router, the real vLLM CPU engine locally and the fake La Plateforme for what a deadline
sends hosted."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from router.accounting.ledger import Ledger, LedgerRow
from router.routing.auth import key_digest
from tests.e2e.conftest import Hosted, Router

pytestmark = pytest.mark.e2e

VAULT = "sk-e2e-vault"


def _extra(tmp_path: Path, **batches: Any) -> dict[str, Any]:
    return {"batches": {"data_dir": str(tmp_path / "batches"), "poll_s": 0.1, **batches}}


def _jsonl(n: int, max_tokens: int = 8, ignore_eos: bool = False) -> io.BytesIO:
    extra = {"ignore_eos": True} if ignore_eos else {}
    return io.BytesIO("\n".join(json.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "demo", "max_tokens": max_tokens, **extra,
                 "messages": [{"role": "user", "content": f"Count to {i}"}]}})
        for i in range(n)).encode())


def _wait(c: openai.OpenAI, batch_id: str, statuses: set[str], timeout_s: float) -> Any:
    end = time.monotonic() + timeout_s
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status in statuses or time.monotonic() > end:
            return b
        time.sleep(0.2)


def _lines(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    return [] if file_id is None else [
        json.loads(x) for x in c.files.content(file_id).text.splitlines() if x]


def _rows(r: Router, batch_id: str) -> list[LedgerRow]:
    assert r.config is not None
    ledger = Ledger(r.config["server"]["ledger_path"])
    try:
        return [x for x in ledger.rows(since=0, until=time.time() + 60, limit=10_000)
                if x.batch_id == batch_id]
    finally:
        ledger.close()


def _router(make_router: Any, tmp_path: Path, api_key: str = "unused-in-open-mode",
            callers: dict[str, Any] | None = None, **batches: Any) -> Router:
    extra: dict[str, Any] = _extra(tmp_path, **batches)
    if callers:
        extra["callers"] = callers
        # With callers the readiness details need an admin key (the fixture adds its own).
        extra["admin_key_sha256"] = [key_digest("sk-e2e-batches-admin")]
    r: Router = make_router(extra=extra, api_key=api_key)
    return r


def test_batch_completes_on_the_engine(make_router: Any, plateforme: Hosted,
                                       tmp_path: Path) -> None:
    r = _router(make_router, tmp_path)
    c = r.client
    f = c.files.create(file=("in.jsonl", _jsonl(6)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                         completion_window="24h")
    done = _wait(c, b.id, {"completed", "failed", "expired", "cancelled"}, 120)
    assert done.status == "completed", done
    out = _lines(c, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(f"line-{i}" for i in range(6))
    assert all(x["response"]["status_code"] == 200 and
               x["response"]["body"]["choices"][0]["message"] for x in out)
    rows = _rows(r, b.id)
    assert len(rows) == 6 and {x.route for x in rows} == {"local"}
    assert plateforme.fake.requests_to("/v1/chat/completions") == []


def test_bad_file_refused_with_line_numbers(make_router: Any, plateforme: Hosted,
                                            tmp_path: Path) -> None:
    r = _router(make_router, tmp_path)
    bad = _jsonl(2).getvalue() + b"\n{\"custom_id\": \"x\"}\n"
    with pytest.raises(openai.BadRequestError) as info:
        r.client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch")
    assert "line 3" in info.value.message


def test_onprem_caller_batch_never_reaches_the_fake(make_router: Any, plateforme: Hosted,
                                                    tmp_path: Path) -> None:
    r = _router(make_router, tmp_path, api_key=VAULT, local_concurrency=1,
                callers={"vault": {"key_sha256": [key_digest(VAULT)], "residency": "onprem"}})
    c = r.client
    f = c.files.create(file=("in.jsonl", _jsonl(40, max_tokens=64)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                         completion_window="8s")  # type: ignore[arg-type]
    done = _wait(c, b.id, {"completed", "failed", "expired", "cancelled"}, 120)
    assert done.status in ("completed", "expired"), done
    assert done.request_counts is not None and done.request_counts.completed >= 1
    out, err = _lines(c, done.output_file_id), _lines(c, done.error_file_id)
    assert len(out) + len(err) == 40
    assert {x.route for x in _rows(r, b.id)} == {"local"}
    assert plateforme.fake.requests_to("/v1/chat/completions") == []


def test_cancel_mid_way(make_router: Any, plateforme: Hosted, tmp_path: Path) -> None:
    r = _router(make_router, tmp_path, local_concurrency=1)
    c = r.client
    f = c.files.create(file=("in.jsonl", _jsonl(30, max_tokens=32)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                         completion_window="24h")
    end = time.monotonic() + 60
    while time.monotonic() < end:
        now = c.batches.retrieve(b.id)
        if now.request_counts is not None and now.request_counts.completed >= 1:
            break
        time.sleep(0.1)
    c.batches.cancel(b.id)
    done = _wait(c, b.id, {"cancelled"}, 60)
    assert done.status == "cancelled"
    assert done.request_counts is not None
    completed = done.request_counts.completed
    assert 1 <= completed < 30
    err = _lines(c, done.error_file_id)
    assert {x["error"]["code"] for x in err} == {"batch_cancelled"}
    assert len(err) == 30 - completed
    assert len(_rows(r, b.id)) == completed


def test_deadline_remainder_goes_as_a_mistral_batch_job(make_router: Any, plateforme: Hosted,
                                                        engine: Any, tmp_path: Path) -> None:
    """The real engine cannot finish 40 lines in 15 s one at a time: the remainder goes as
    La Plateforme batch jobs (the fake's), booked at the batch price."""
    from tests.e2e.conftest import e2e_config

    demo = e2e_config(engine.base_url, plateforme.url, plateforme.url)["aliases"]["demo"]
    batch_price = {"input_per_mtok": 0.05, "output_per_mtok": 0.15}
    demo["hosted"] = [{**demo["hosted"][0], "batch_price": batch_price}]
    plateforme.fake.job_s = 1.0
    extra = {**_extra(tmp_path, local_concurrency=1), "aliases": {"demo": demo}}
    r: Router = make_router(extra=extra)
    c = r.client
    # Every answer its full length (random weights stop at a random EOS): one at a time,
    # 40 of them take the engine far longer than the window on any machine.
    f = c.files.create(file=("in.jsonl", _jsonl(40, max_tokens=256, ignore_eos=True)),
                       purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                         completion_window="15s")  # type: ignore[arg-type]
    done = _wait(c, b.id, {"completed", "failed", "expired", "cancelled"}, 120)
    assert done.status == "completed", done
    out = _lines(c, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(f"line-{i}" for i in range(40))
    rows = _rows(r, b.id)
    hosted = [x for x in rows if x.route == "hosted"]
    assert len(rows) == 40 and hosted and len(hosted) < 40
    assert plateforme.fake.requests_to("/v1/chat/completions") == []
    assert plateforme.fake.requests_to("/v1/batch/jobs")
    for x in hosted:
        assert x.cost_usd == pytest.approx(
            (x.prompt_tokens * 0.05 + x.completion_tokens * 0.15) / 1e6)
        assert x.prompt_tokens > 0


def test_serve_killed_mid_batch_resumes_without_loss_or_repeat(
        engine: Any, plateforme: Hosted, backup: Hosted, tmp_path: Path) -> None:
    """kill -9 of a real `spillover serve` mid-batch (the real engine keeps running), then a
    restart on the same data dir: the batch completes, every custom_id is in the output
    once, no line finished before the kill ran again, and every line has exactly one ledger
    row that is not a rerun's wasted one."""
    import os
    import signal
    import sqlite3

    from tests.e2e.conftest import e2e_config
    from tests.e2e.test_faults_e2e import Served

    data = e2e_config(engine.base_url, plateforme.url, backup.url)
    data["batches"] = {"data_dir": str(tmp_path / "batches"), "poll_s": 0.1,
                       "local_concurrency": 2}
    env = {"MISTRAL_API_KEY": plateforme.fake.api_key, "BACKUP_API_KEY": backup.fake.api_key}
    n = 16
    first = Served(tmp_path, dict(data), env, no_engines=True)
    second: Served | None = None
    try:
        first.wait(lambda st: st["engines"]["demo-local"]["healthy"], 60, "the engine")
        f = first.client.files.create(file=("in.jsonl", _jsonl(n, max_tokens=48)),
                                      purpose="batch")
        b = first.client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="1h")  # type: ignore[arg-type]
        end = time.monotonic() + 300
        while True:
            now = first.client.batches.retrieve(b.id)
            assert now.status in ("validating", "in_progress"), now
            assert now.request_counts is not None and now.request_counts.failed == 0, now
            if now.request_counts.completed >= 3:
                break
            assert time.monotonic() < end, "no line finished"
            time.sleep(0.1)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        with sqlite3.connect(first.ledger_path) as db:
            done_before = {r[0] for r in db.execute(
                "SELECT line_no FROM batch_lines WHERE batch_id = ? AND state = 'done'",
                (b.id,))}
        assert 0 < len(done_before) < n, done_before

        second = Served(tmp_path, dict(data), env, no_engines=True)
        second.wait(lambda st: st["engines"]["demo-local"]["healthy"], 120,
                    "the restarted router")
        done = _wait(second.client, b.id, {"completed", "failed", "expired"}, 600)
        assert done.status == "completed", done
        out = _lines(second.client, done.output_file_id)
        with sqlite3.connect(second.ledger_path) as db:
            rows = list(db.execute("SELECT request_id, wasted FROM calls WHERE batch_id = ?",
                                   (b.id,)))
    finally:
        for s in (first, second):
            if s is not None:
                s.stop()
    assert sorted(x["custom_id"] for x in out) == sorted(f"line-{i}" for i in range(n))
    assert all(x["response"]["status_code"] == 200 for x in out)
    counted: dict[str, int] = {}
    every: dict[str, int] = {}
    for rid, wasted in rows:
        every[rid] = every.get(rid, 0) + 1
        if not wasted:
            counted[rid] = counted.get(rid, 0) + 1
    assert len(counted) == n and set(counted.values()) == {1}, counted
    # A line finished before the kill never ran again: its only row is the first one.
    assert all(every[f"{b.id}-{ln}"] == 1 for ln in done_before), every
