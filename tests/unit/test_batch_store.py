"""Batch storage: file validation with line numbers, bounds, ownership, claim/finish/resume."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.accounting.batches import (
    BatchInputError,
    BatchStore,
    FileTooLarge,
    window_seconds,
)
from router.config import Batches


def _line(cid: str, url: str = "/v1/chat/completions", **body: Any) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url,
                       "body": {"model": "m", "messages": [], **body}})


def _store(tmp_path: Path, **limits: Any) -> BatchStore:
    return BatchStore(str(tmp_path / "ledger.db"), tmp_path / "files", Batches(**limits))


def _upload(store: BatchStore, text: str, caller: str = "alice") -> dict[str, Any]:
    return store.save_file(caller, "in.jsonl", "batch", io.BytesIO(text.encode()))


def _allow(body: dict[str, Any]) -> tuple[str, str] | None:
    return None


def test_bad_lines_are_refused_with_their_numbers(tmp_path: Path) -> None:
    store = _store(tmp_path, max_line_bytes=300)
    text = "\n".join([
        _line("a"),
        "not json",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}),
        _line("a"),
        _line("b", url="/v1/completions"),
        _line("c", messages=[{"role": "user", "content": "x" * 400}]),
        _line("d", stream=True),
    ])
    with pytest.raises(BatchInputError) as info:
        _upload(store, text)
    got = [(p.line, p.code) for p in info.value.problems]
    assert got == [(2, "invalid_json"), (3, "missing_custom_id"), (4, "duplicate_custom_id"),
                   (5, "invalid_url"), (6, "request_too_large"), (7, "invalid_body")]
    assert "line 2" in info.value.message and "line 4" in info.value.message
    # Nothing of a refused file stays on disk.
    assert list((tmp_path / "files").iterdir()) == []


def test_file_size_is_bounded_and_streamed(tmp_path: Path) -> None:
    store = _store(tmp_path, max_file_bytes=2048)
    big = "\n".join(_line(f"id{i}") for i in range(100))
    with pytest.raises(FileTooLarge):
        _upload(store, big)
    assert list((tmp_path / "files").iterdir()) == []
    ok = _upload(store, "\n".join(_line(f"id{i}") for i in range(3)) + "\n")
    assert ok["object"] == "file" and ok["purpose"] == "batch"
    assert store.path(ok["id"]).read_bytes().count(b"\n") == 3


def test_files_and_batches_are_the_owners_only(tmp_path: Path) -> None:
    store = _store(tmp_path)
    f = _upload(store, _line("a"))
    assert store.get_file("bob", f["id"]) is None
    with pytest.raises(Exception, match="no file"):
        store.create_batch("bob", f["id"], "/v1/chat/completions", "24h", None, _allow)
    b = store.create_batch("alice", f["id"], "/v1/chat/completions", "24h", {"k": "v"}, _allow)
    assert store.get_batch("bob", b["id"]) is None
    assert store.list_batches("bob", None, 10) == []
    assert [x["id"] for x in store.list_batches("alice", None, 10)] == [b["id"]]
    assert store.cancel("bob", b["id"]) is None
    assert not store.delete_file("bob", f["id"])
    assert store.delete_file("alice", f["id"])
    assert store.get_file("alice", f["id"]) is None


def test_batch_create_fails_with_line_numbers_for_endpoint_and_policy(tmp_path: Path) -> None:
    store = _store(tmp_path)
    f = _upload(store, "\n".join([_line("a"), _line("b", url="/v1/embeddings"),
                                  json.dumps({"custom_id": "c", "method": "POST",
                                              "url": "/v1/chat/completions",
                                              "body": {"model": "secret"}})]))

    def check(body: dict[str, Any]) -> tuple[str, str] | None:
        return ("model_not_found", "no such model") if body["model"] == "secret" else None

    b = store.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, check)
    assert b["status"] == "failed" and b["failed_at"] is not None
    assert [(e["line"], e["code"]) for e in b["errors"]["data"]] == [
        (2, "invalid_url"), (3, "model_not_found")]
    assert b["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


def test_window_durations() -> None:
    assert window_seconds("24h") == 86400
    assert window_seconds("90s") == 90
    assert window_seconds("0s") is None and window_seconds("8d") is None
    assert window_seconds("24 h") is None


def test_a_restarted_store_never_repeats_a_finished_line(tmp_path: Path) -> None:
    store = _store(tmp_path)
    f = _upload(store, "\n".join(_line(f"id{i}") for i in range(5)))
    b = store.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, _allow)
    first = store.claim(b["id"], 3, "local")
    assert [x.custom_id for x in first] == ["id0", "id1", "id2"]
    assert store.read_line(f["id"], first[1])["custom_id"] == "id1"
    for line in first[:2]:
        store.finish_line(line, ok=True, status_code=200, request_id="r", route="local",
                          result=orjson.dumps({"n": line.custom_id}))
    # Killed here: id2 was in flight, with no result. The database is all that survives.
    again = _store(tmp_path)
    assert again.recover() == 1
    rest = again.claim(b["id"], 10, "local")
    assert [x.custom_id for x in rest] == ["id2", "id3", "id4"]
    # A late result for a finished line does not overwrite it.
    again.finish_line(first[0], ok=False, status_code=500, request_id="x", route="hosted",
                      result=b"{}")
    for line in rest:
        again.finish_line(line, ok=line.custom_id != "id4",
                          status_code=200 if line.custom_id != "id4" else 400,
                          request_id="r", route="local", result=b'{"e": 1}')
    assert again.counts(b["id"])["completed"] == 4
    again.finalize(b["id"], "completed")
    done = again.get_batch("alice", b["id"])
    assert done is not None and done["status"] == "completed"
    assert done["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    out = [orjson.loads(x) for x in again.path(done["output_file_id"]).read_bytes().split(
        b"\n") if x]
    assert [x["custom_id"] for x in out] == ["id0", "id1", "id2", "id3"]
    assert out[0]["response"] == {"status_code": 200, "request_id": "r", "body": {"n": "id0"}}
    err = [orjson.loads(x) for x in again.path(done["error_file_id"]).read_bytes().split(
        b"\n") if x]
    assert [(x["custom_id"], x["response"]["status_code"]) for x in err] == [("id4", 400)]


def test_output_lines_split_as_lines_whatever_the_model_wrote(tmp_path: Path) -> None:
    """A model's text may hold U+2028, U+2029 or U+0085, which JSON leaves raw inside
    strings and str.splitlines() (the openai cookbook's way to read an output file) splits
    on: each result is still one line, and reads back as written."""
    store = _store(tmp_path)
    f = _upload(store, "\n".join(_line(f"id{i}") for i in range(2)))
    b = store.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, _allow)
    text = "one\u2028two\u2029three\x85four \u00e9\u4e2d\n\r"
    for line in store.claim(b["id"], 2, "local"):
        store.finish_line(line, ok=True, status_code=200, request_id="r", route="local",
                          result=orjson.dumps({"content": text}))
    store.finalize(b["id"], "completed")
    done = store.get_batch("alice", b["id"])
    assert done is not None
    lines = store.path(done["output_file_id"]).read_bytes().decode().splitlines()
    assert [json.loads(x)["response"]["body"]["content"] for x in lines] == [text, text]


def test_two_stores_on_one_database_never_claim_the_same_line(tmp_path: Path) -> None:
    a, b = _store(tmp_path), _store(tmp_path)
    f = _upload(a, "\n".join(_line(f"id{i}") for i in range(20)))
    batch = a.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, _allow)
    taken: list[str] = []
    for _ in range(5):
        taken += [x.custom_id for x in a.claim(batch["id"], 3, "local")]
        taken += [x.custom_id for x in b.claim(batch["id"], 2, "local")]
    assert sorted(taken) == sorted(f"id{i}" for i in range(20))


def test_expired_batch_reports_unrun_lines(tmp_path: Path) -> None:
    store = _store(tmp_path)
    f = _upload(store, "\n".join(_line(f"id{i}") for i in range(3)))
    b = store.create_batch("alice", f["id"], "/v1/chat/completions", "1m", None, _allow)
    (line,) = store.claim(b["id"], 1, "local")
    store.finish_line(line, ok=True, status_code=200, request_id="r", route="local",
                      result=b"{}")
    store.finalize(b["id"], "expired")
    done = store.get_batch("alice", b["id"])
    assert done is not None and done["status"] == "expired"
    err = [orjson.loads(x) for x in store.path(done["error_file_id"]).read_bytes().split(
        b"\n") if x]
    assert [(x["custom_id"], x["error"]["code"]) for x in err] == [
        ("id1", "batch_expired"), ("id2", "batch_expired")]


async def test_usage_groups_ledger_rows_by_batch(tmp_path: Path) -> None:
    from router.accounting.ledger import Ledger, LedgerRow

    def row(rid: str, batch: str, cost: float) -> LedgerRow:
        return LedgerRow(ts=100.0, request_id=rid, caller="alice", alias="m", route="hosted",
                         backend="mistral", model_id="m", prompt_tokens=1,
                         completion_tokens=1, cost_usd=cost, hosted_equiv_usd=cost,
                         latency_s=0.1, ttft_s=None, status=200, reason="batch",
                         endpoint="chat", batch_id=batch)

    async with Ledger(tmp_path / "l.db") as ledger:
        for r in (row("1", "batch-a", 1.0), row("2", "batch-a", 2.0), row("3", "", 4.0)):
            await ledger.record(r)
        got = {g["batch"]: (g["requests"], g["cost_usd"])
               for g in ledger.usage(since=0, until=200, group_by=["batch"])}
    assert got == {"batch-a": (2, 3.0), "": (1, 4.0)}


def test_result_files_are_written_a_page_at_a_time(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import router.accounting.batches as batches

    monkeypatch.setattr(batches, "_PAGE", 2)
    store = _store(tmp_path)
    f = _upload(store, "\n".join(_line(f"id{i}") for i in range(7)))
    b = store.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, _allow)
    for line in store.claim(b["id"], 7, "local"):
        store.finish_line(line, ok=line.line_no % 3 != 0, status_code=200, request_id="r",
                          route="local", result=orjson.dumps({"n": line.line_no}))
    store.finalize(b["id"], "completed")
    done = store.get_batch("alice", b["id"])
    assert done is not None
    out = [orjson.loads(x)["custom_id"] for x in store.path(done["output_file_id"])
           .read_bytes().splitlines()]
    err = [orjson.loads(x)["custom_id"] for x in store.path(done["error_file_id"])
           .read_bytes().splitlines()]
    assert out == ["id0", "id1", "id3", "id4", "id6"] and err == ["id2", "id5"]
    assert store.get_file("alice", done["output_file_id"])["purpose"] == "batch_output"  # type: ignore[index]


async def test_a_line_rerun_after_a_kill_keeps_one_ledger_row(tmp_path: Path) -> None:
    """A line whose ledger row was committed but whose result was not (killed between the
    two) runs again after the restart: the earlier attempt's row goes with the reset, so
    the line is counted once; rows of finished lines and of other calls stay."""
    from router.accounting.batches import line_request_id
    from router.accounting.ledger import Ledger, LedgerRow

    store = _store(tmp_path)
    f = _upload(store, "\n".join(_line(f"id{i}") for i in range(3)))
    b = store.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, _allow)
    lines = store.claim(b["id"], 2, "hosted")

    def row(rid: str, batch: str) -> LedgerRow:
        return LedgerRow(ts=100.0, request_id=rid, caller="alice", alias="m", route="hosted",
                         backend="mistral", model_id="m", prompt_tokens=10,
                         completion_tokens=5, cost_usd=1.0, hosted_equiv_usd=2.0,
                         latency_s=0.1, ttft_s=None, status=200, reason="forced",
                         endpoint="chat", batch_id=batch, priority="batch")

    async with Ledger(tmp_path / "ledger.db") as ledger:
        for line in lines:  # both lines' calls were booked...
            await ledger.record(row(line_request_id(b["id"], line.line_no), b["id"]))
        await ledger.record(row(line_request_id(b["id"], 3), ""))  # not a batch line's
        # ...but only the first line's result was committed before the kill.
        store.finish_line(lines[0], ok=True, status_code=200, route="hosted", result=b"{}",
                          request_id=line_request_id(b["id"], lines[0].line_no))
        store.close()
        again = _store(tmp_path)
        assert again.recover() == 1
        rerun = again.claim(b["id"], 1, "hosted")
        assert [x.line_no for x in rerun] == [lines[1].line_no]
        await ledger.record(row(line_request_id(b["id"], rerun[0].line_no), b["id"]))
        got = {g["batch"]: g["requests"]
               for g in ledger.usage(since=0, until=200, group_by=["batch"])}
    assert got == {b["id"]: 2, "": 1}


async def test_a_rerun_line_keeps_its_first_attempts_cost_and_is_output_once(
        tmp_path: Path) -> None:
    """A hosted line billed before the kill and run again after it: the first attempt's row
    stays in the ledger (marked wasted) with its cost, usage counts the line's request once
    and both attempts' spend, and the output file has the line once."""
    from router.accounting.batches import line_request_id
    from router.accounting.ledger import BATCH_RERUN, Ledger, LedgerRow

    store = _store(tmp_path)
    f = _upload(store, "\n".join(_line(f"id{i}") for i in range(2)))
    b = store.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, _allow)
    first, second = store.claim(b["id"], 2, "hosted")

    def row(line_no: int, cost: float) -> LedgerRow:
        return LedgerRow(ts=100.0 + cost, request_id=line_request_id(b["id"], line_no),
                         caller="alice", alias="m", route="hosted", backend="mistral",
                         model_id="m", prompt_tokens=10, completion_tokens=5, cost_usd=cost,
                         hosted_equiv_usd=2 * cost, latency_s=0.1, ttft_s=None, status=200,
                         reason="forced", endpoint="chat", batch_id=b["id"], priority="batch")

    async with Ledger(tmp_path / "ledger.db") as ledger:
        await ledger.record(row(first.line_no, 1.0))
        await ledger.record(row(second.line_no, 2.0))  # billed, then the kill
        store.finish_line(first, ok=True, status_code=200, route="hosted", result=b"{}",
                          request_id=line_request_id(b["id"], first.line_no))
        store.close()
        again = _store(tmp_path)
        assert again.recover() == 1
        (rerun,) = again.claim(b["id"], 1, "hosted")
        await ledger.record(row(rerun.line_no, 4.0))
        again.finish_line(rerun, ok=True, status_code=200, route="hosted", result=b"{}",
                          request_id=line_request_id(b["id"], rerun.line_no))
        (total,) = ledger.usage(since=0, until=200, group_by=["batch"])
        with sqlite3.connect(tmp_path / "ledger.db") as db:
            marks = [r[0] for r in db.execute(
                "SELECT wasted FROM calls WHERE request_id = ? ORDER BY ts",
                (line_request_id(b["id"], second.line_no),))]
        again.finalize(b["id"], "completed")
        done = again.get_batch("alice", b["id"])
        assert done is not None
        out = [json.loads(x) for x in again.path(done["output_file_id"]).read_text().split("\n")
               if x]
    assert total["requests"] == 2  # each line once
    assert total["cost_usd"] == pytest.approx(7.0)  # the billed first attempt included
    assert total["prompt_tokens"] == 30
    assert marks == [BATCH_RERUN, ""]
    assert sorted(x["custom_id"] for x in out) == ["id0", "id1"]
