"""The Batch API through the app, with the openai SDK as the caller and a mock engine and
La Plateforme (no network): completion, refusals with line numbers, ownership, the hosted
remainder a deadline forces (at the batch price), on-prem batches that never leave,
cancel, and a restart that does not repeat finished lines."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router.accounting.batches import BatchStore
from router.app import Settings, create_app
from router.config import Batches
from router.routing.auth import key_digest
from tests.unit.helpers import BASE_YAML, World, completion, config

ALICE, BOB, VAULT = "sk-alice", "sk-bob", "sk-vault"


def _config(tmp_path: Path, batch_price: bool = True, *, provider_kind: str = "mistral",
            **batches: Any) -> Any:
    """`provider_kind`: "mistral" has a batch API of its own (a deadline's remainder goes
    as a La Plateforme batch job, tests/unit/test_batch_mistral_jobs.py); "openai" has
    none (ordinary hosted calls at the batch class)."""
    text = BASE_YAML.replace("kind: mistral", f"kind: {provider_kind}")
    text = text if not batch_price else text.replace(
        "price: {input_per_mtok: 0.1, output_per_mtok: 0.3}",
        "price: {input_per_mtok: 0.1, output_per_mtok: 0.3}\n"
        "        batch_price: {input_per_mtok: 0.05, output_per_mtok: 0.15}")
    return config(text, callers={
        "alice": {"key_sha256": [key_digest(ALICE)]},
        "bob": {"key_sha256": [key_digest(BOB)]},
        "vault": {"key_sha256": [key_digest(VAULT)], "residency": "onprem"},
    }, server={"request_timeout_s": 5, "metrics_interval_s": 60,
               "ledger_path": str(tmp_path / "ledger.db"),
               "ledger_spool_dir": str(tmp_path / "spool")},
        batches={"data_dir": str(tmp_path / "batches"), "poll_s": 0.05, **batches})


@asynccontextmanager
async def _app(tmp_path: Path, world: World, batch_price: bool = True, *,
               provider_kind: str = "mistral",
               transport: httpx.AsyncBaseTransport | None = None, **batches: Any,
               ) -> AsyncIterator[dict[str, openai.AsyncOpenAI]]:
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}),
                     config=_config(tmp_path, batch_price, provider_kind=provider_kind,
                                    **batches),
                     transport=transport or world.transport())
    async with app.router.lifespan_context(app):
        clients = {}
        for name, key in (("alice", ALICE), ("bob", BOB), ("vault", VAULT)):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gw")
            clients[name] = openai.AsyncOpenAI(api_key=key, base_url="http://gw/v1",
                                               http_client=http,  # type: ignore[arg-type]
                                               max_retries=0)
        yield clients


def _jsonl(n: int, url: str = "/v1/chat/completions", model: str = "demo") -> bytes:
    return "\n".join(json.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": url,
        "body": {"model": model, "max_tokens": 8,
                 "messages": [{"role": "user", "content": f"req-{i}"}]}})
        for i in range(n)).encode() + b"\n"


async def _until(client: openai.AsyncOpenAI, batch_id: str, statuses: set[str],
                 timeout_s: float = 20.0) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        b = await client.batches.retrieve(batch_id)
        if b.status in statuses or loop.time() > end:
            return b
        await asyncio.sleep(0.05)


async def _lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(x) for x in content.text.splitlines() if x]


def _asked(req: httpx.Request) -> str:
    return str(json.loads(req.content)["messages"][0]["content"])


async def test_batch_runs_locally_to_completed(tmp_path: Path) -> None:
    world = World()
    async with _app(tmp_path, world) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(6))),
                                          purpose="batch")
        assert f.purpose == "batch" and f.bytes > 0
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h", metadata={"job": "t"})
        assert b.status in ("validating", "in_progress") and b.metadata == {"job": "t"}
        done = await _until(c["alice"], b.id, {"completed", "failed", "expired"})
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (6, 6)
        out = await _lines(c["alice"], done.output_file_id)
        assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(6))
        assert all(x["response"]["status_code"] == 200 for x in out)
        assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "local answer"
        assert world.bodies("hosted") == []
        # One ledger row per line, grouped under the batch in /v1/usage.
        http = c["alice"]._client
        usage = (await http.get("http://gw/v1/usage?group_by=batch",
                                headers={"authorization": f"Bearer {ALICE}"})).json()
        per_batch = {g["batch"]: g["requests"] for g in usage["data"]}
        assert per_batch == {b.id: 6}
        listed = await c["alice"].batches.list()
        assert [x.id for x in listed.data] == [b.id]


async def test_bad_files_are_refused_with_line_numbers(tmp_path: Path) -> None:
    async with _app(tmp_path, World()) as c:
        bad = _jsonl(2) + b"not json\n" + _jsonl(1)  # line 3 bad, line 4 repeats req-0
        with pytest.raises(openai.BadRequestError) as info:
            await c["alice"].files.create(file=("in.jsonl", io.BytesIO(bad)), purpose="batch")
        assert "line 3" in info.value.message and "line 4" in info.value.message
        assert info.value.code == "invalid_batch_file"
        # A line for another endpoint, or a model the caller may not use: the batch fails
        # at once, each line with its number, as OpenAI reports it.
        mixed = _jsonl(1) + _jsonl(1, url="/v1/embeddings").replace(b"req-0", b"e-0") + \
            _jsonl(1, model="nope").replace(b"req-0", b"n-0")
        f = await c["alice"].files.create(file=("m.jsonl", io.BytesIO(mixed)),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h")
        assert b.status == "failed" and b.errors is not None and b.errors.data is not None
        assert [(e.line, e.code) for e in b.errors.data] == [(2, "invalid_url"),
                                                             (3, "model_not_found")]
        with pytest.raises(openai.BadRequestError):
            await c["alice"].batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                            completion_window="24h")


async def test_file_size_bound(tmp_path: Path) -> None:
    async with _app(tmp_path, World(), max_file_bytes=4096) as c:
        with pytest.raises(openai.APIStatusError) as info:
            await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(100))),
                                          purpose="batch")
        assert info.value.status_code == 413
    assert list((tmp_path / "batches").glob("*.jsonl")) == []


async def test_a_caller_sees_only_its_own(tmp_path: Path) -> None:
    async with _app(tmp_path, World()) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(1))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h")
        for call in (c["bob"].files.retrieve(f.id), c["bob"].files.content(f.id),
                     c["bob"].files.delete(f.id), c["bob"].batches.retrieve(b.id),
                     c["bob"].batches.cancel(b.id),
                     c["bob"].batches.create(input_file_id=f.id,
                                             endpoint="/v1/chat/completions",
                                             completion_window="24h")):
            with pytest.raises(openai.NotFoundError):
                await call
        assert (await c["bob"].batches.list()).data == []


async def test_deadline_sends_the_remainder_hosted_at_the_batch_price(tmp_path: Path) -> None:
    world = World()

    async def slow_local(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.4)
        return httpx.Response(200, json=completion("demo", "local answer"))

    world.local = slow_local  # type: ignore[assignment]
    # A provider without a batch API of its own: ordinary hosted calls at the batch class.
    async with _app(tmp_path, world, local_concurrency=1, provider_kind="openai") as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(12))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="4s")  # type: ignore[arg-type]
        done = await _until(c["alice"], b.id, {"completed", "expired", "failed"})
        assert done.status == "completed", done
        out = await _lines(c["alice"], done.output_file_id)
        assert len(out) == 12
        answers = Counter(x["response"]["body"]["choices"][0]["message"]["content"]
                          for x in out)
        assert answers["local answer"] >= 1 and answers["hosted answer"] >= 1
        rows = c["alice"]._client
        usage = (await rows.get("http://gw/v1/usage?group_by=route",
                                headers={"authorization": f"Bearer {ALICE}"})).json()
        hosted = next(g for g in usage["data"] if g["route"] == "hosted")
        # 1000 prompt + 2000 completion tokens a hosted line at the batch price.
        assert hosted["cost_usd"] == pytest.approx(
            hosted["requests"] * (1000 * 0.05 + 2000 * 0.15) / 1e6)


async def test_onprem_batch_never_leaves_and_expires(tmp_path: Path) -> None:
    world = World()

    async def slow_local(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.5)
        return httpx.Response(200, json=completion("demo", "local answer"))

    world.local = slow_local  # type: ignore[assignment]
    async with _app(tmp_path, world, local_concurrency=1) as c:
        f = await c["vault"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(10))),
                                          purpose="batch")
        b = await c["vault"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="2s")  # type: ignore[arg-type]
        done = await _until(c["vault"], b.id, {"completed", "expired", "failed"})
        assert done.status == "expired", done
        assert done.request_counts is not None
        assert 1 <= done.request_counts.completed < 10
        out = await _lines(c["vault"], done.output_file_id)
        err = await _lines(c["vault"], done.error_file_id)
        assert len(out) == done.request_counts.completed
        assert {x["error"]["code"] for x in err} == {"batch_expired"}
        assert len(out) + len(err) == 10
    assert world.bodies("hosted") == []


async def test_cancel_lets_in_flight_finish_and_reports_counts(tmp_path: Path) -> None:
    world = World()

    async def slow_local(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        return httpx.Response(200, json=completion("demo", "local answer"))

    world.local = slow_local  # type: ignore[assignment]
    async with _app(tmp_path, world, local_concurrency=2) as c:
        f = await c["vault"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(20))),
                                          purpose="batch")
        b = await c["vault"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h")
        await _until(c["vault"], b.id, {"in_progress"})
        await asyncio.sleep(0.5)
        cancelling = await c["vault"].batches.cancel(b.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = await _until(c["vault"], b.id, {"cancelled"})
        assert done.status == "cancelled" and done.cancelled_at is not None
        assert done.request_counts is not None
        completed = done.request_counts.completed
        assert 1 <= completed < 20
        err = await _lines(c["vault"], done.error_file_id)
        assert len(err) == 20 - completed
        assert {x["error"]["code"] for x in err} == {"batch_cancelled"}
        sent = len(world.bodies("local"))
        await asyncio.sleep(0.5)
        assert len(world.bodies("local")) == sent  # nothing fed after the cancel
        assert sent == completed  # in-flight lines finished and were reported


async def test_restart_resumes_without_repeating_finished_lines(tmp_path: Path) -> None:
    world = World()
    finished: list[str] = []
    three = asyncio.Event()

    async def slow_local(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        finished.append(_asked(req))
        if len(finished) >= 3:
            three.set()
        return httpx.Response(200, json=completion("demo", _asked(req)))

    world.local = slow_local  # type: ignore[assignment]
    async with _app(tmp_path, world, local_concurrency=2) as c:
        f = await c["vault"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(10))),
                                          purpose="batch")
        b = await c["vault"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h")
        await asyncio.wait_for(three.wait(), 20)
    # The router stopped mid-batch: what its database holds as finished is all that counts.
    store = BatchStore(str(tmp_path / "ledger.db"), tmp_path / "batches", Batches())
    done_before = {cid for (cid,) in store._rows(
        "SELECT custom_id FROM batch_lines WHERE state = 'done'")}
    store.close()
    before = list(finished)
    assert 2 <= len(done_before) < 10
    async with _app(tmp_path, world, local_concurrency=2) as c:
        done = await _until(c["vault"], b.id, {"completed", "expired", "failed"})
        assert done.status == "completed", done
        out = await _lines(c["vault"], done.output_file_id)
    ids = [x["custom_id"] for x in out]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(10))
    # Every line answered exactly once; none finished before the stop ran again.
    again = finished[len(before):]
    assert not done_before & set(again)
    assert {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"]
            for x in out} == {f"req-{i}": f"req-{i}" for i in range(10)}


@pytest.mark.parametrize("batch_price", [True, False])
async def test_engine_down_goes_hosted_only_at_a_batch_price(tmp_path: Path,
                                                             batch_price: bool) -> None:
    world = World(local_up=False)
    async with _app(tmp_path, world, batch_price=batch_price, provider_kind="openai") as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(4))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="2s")  # type: ignore[arg-type]
        done = await _until(c["alice"], b.id, {"completed", "expired", "failed"})
        assert done.request_counts is not None
        if batch_price:
            assert done.status == "completed" and done.request_counts.completed == 4
            assert len(world.bodies("hosted")) == 4
        else:
            # No hosted price for batch work: nothing leaves at the full price.
            assert done.status == "expired" and done.request_counts.completed == 0
            assert world.bodies("hosted") == []
