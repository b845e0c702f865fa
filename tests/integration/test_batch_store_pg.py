"""Batch storage on PostgreSQL (replicas sharing batches) and on SQLite, same behaviour:
validation, claims that never overlap across stores, leases, one finalisation."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.accounting.batches import BatchStore
from router.accounting.pg import PgTarget
from router.config import Batches


def _line(cid: str) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": []}})


def _allow(body: dict[str, Any]) -> tuple[str, str] | None:
    return None


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "pg"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    db: str | PgTarget = str(tmp_path / "ledger.db")
    if request.param == "pg":
        db = PgTarget.from_url(request.getfixturevalue("pg_url"), "TEST_DATABASE_URL")
    stores: list[BatchStore] = []

    def make(clock: Clock | None = None) -> BatchStore:
        s = BatchStore(db, tmp_path / "files", Batches(), lease_s=100,
                       **({"clock": clock} if clock else {}))
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


def test_replicas_share_lines_without_overlap_and_finalize_once(open_store: Any) -> None:
    a, b = open_store(), open_store()
    f = a.save_file("alice", "in.jsonl", "batch",
                    io.BytesIO("\n".join(_line(f"id{i}") for i in range(30)).encode()))
    batch = a.create_batch("alice", f["id"], "/v1/chat/completions", "24h", {"k": "v"}, _allow)
    assert b.get_batch("alice", batch["id"])["metadata"] == {"k": "v"}
    assert b.get_batch("bob", batch["id"]) is None
    taken: list[str] = []
    while True:
        got = a.claim(batch["id"], 4, "local") + b.claim(batch["id"], 3, "hosted")
        if not got:
            break
        for line in got:
            taken.append(line.custom_id)
            (a if line.line_no % 2 else b).finish_line(
                line, ok=True, status_code=200, request_id="r", route="local",
                result=orjson.dumps({"n": line.custom_id}))
    assert sorted(taken) == sorted(f"id{i}" for i in range(30))
    a.finalize(batch["id"], "completed")
    b.finalize(batch["id"], "completed")  # the other replica: already done, no second file
    done = b.get_batch("alice", batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 30, "completed": 30, "failed": 0}
    outputs = [x for x in a.list_files("alice") if x["purpose"] == "batch_output"]
    assert [x["id"] for x in outputs] == [done["output_file_id"]]


def test_a_dead_replicas_lines_come_back_after_its_lease(open_store: Any) -> None:
    clock = Clock()
    a, b = open_store(clock), open_store(clock)
    f = a.save_file("alice", "in.jsonl", "batch",
                    io.BytesIO("\n".join(_line(f"id{i}") for i in range(4)).encode()))
    batch = a.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, _allow)
    first = a.claim(batch["id"], 3, "local")
    a.finish_line(first[0], ok=True, status_code=200, request_id="r", route="local",
                  result=b"{}")
    # `a` dies holding two lines. SQLite (one router) gives them back at the next start;
    # PostgreSQL only once their lease ran out, so a live replica's lines are not run twice.
    if b.shared:
        assert b.recover() == 0
        clock.now += 101
    assert b.recover() == 2
    again = b.claim(batch["id"], 10, "local")
    assert sorted(x.custom_id for x in again) == ["id1", "id2", "id3"]


def test_a_job_intent_keeps_its_lines_until_its_job_is_found_or_not(open_store: Any) -> None:
    """A La Plateforme job's intent (its token, written before the create call) holds its
    lines: a restart does not run them again (recover() leaves them), it finds the job by the
    token (job_created: the provider's id replaces it) or, when there is none, gives the
    lines back (end_job)."""
    from router.accounting.batches import is_job_token, new_job_token

    a = open_store()
    f = a.save_file("alice", "in.jsonl", "batch",
                    io.BytesIO("\n".join(_line(f"id{i}") for i in range(5)).encode()))
    batch = a.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, _allow)
    found, lost = new_job_token(), new_job_token()
    a.intend_job(batch["id"], found, "mistral", a.claim(batch["id"], 3, "hosted"))
    a.intend_job(batch["id"], lost, "mistral", a.claim(batch["id"], 2, "hosted"))
    b = open_store()  # the restarted router
    assert b.recover() == 0
    assert sorted(j for j, _, _ in b.open_jobs(batch["id"])) == sorted([found, lost])
    assert all(is_job_token(j) for j, _, _ in b.open_jobs(batch["id"]))
    b.job_created(found, "0f0e6b3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
    assert not is_job_token("0f0e6b3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
    assert [x.custom_id for x in b.job_lines("0f0e6b3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b")] == [
        "id0", "id1", "id2"]
    b.end_job(lost, "not_created")
    assert [j for j, _, _ in b.open_jobs(batch["id"])] == [
        "0f0e6b3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"]
    assert sorted(x.custom_id for x in b.claim(batch["id"], 10, "local")) == ["id3", "id4"]


def test_a_database_restart_is_unavailable_then_reconnected(tmp_path: Path) -> None:
    """PostgreSQL stopped under the batch store (a restart, a failover): its calls raise
    StoreUnavailable (the scheduler pauses on it, the API answers 503) instead of the
    driver's errors, and once the server is back the store reconnects by itself."""
    from router.accounting.ledger import StoreUnavailable
    from tests.pg import PgCluster

    cluster = PgCluster()
    cluster.start()
    try:
        target = PgTarget.from_url(cluster.create_database(), "TEST_DATABASE_URL")
        store = BatchStore(target, tmp_path / "files", Batches(), lease_s=100)
        f = store.save_file("alice", "in.jsonl", "batch",
                            io.BytesIO("\n".join(_line(f"id{i}") for i in range(3)).encode()))
        b = store.create_batch("alice", f["id"], "/v1/chat/completions", "24h", None, _allow)
        cluster.pause()
        with pytest.raises(StoreUnavailable):
            store.active()
        with pytest.raises(StoreUnavailable):  # still down: refused again, never stuck
            store.claim(b["id"], 1, "local")
        cluster.resume()
        assert [row[0] for row in store.active()] == [b["id"]]
        assert [x.custom_id for x in store.claim(b["id"], 3, "local")] == ["id0", "id1", "id2"]
        store.close()
    finally:
        cluster.stop()
