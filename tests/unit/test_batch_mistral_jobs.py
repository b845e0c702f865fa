"""The hosted remainder of a batch through La Plateforme's own Batch API: one batch job
(file upload, job, polling, output file mapped back to custom_ids), ledger rows at the batch
price with the job's usage; cancel cancels the job; a restart polls the job again instead
of resubmitting. The fake La Plateforme is served in-process (no socket)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.plateforme import FakePlateforme, create_app
from tests.unit.helpers import HOSTED, HOSTED_KEY, World, completion
from tests.unit.test_batch_api import ALICE, _app, _jsonl, _lines, _until

BATCH_PRICE = (0.05, 0.15)  # $/Mtok in, out: the batch_price _config sets


class _Both(httpx.AsyncBaseTransport):
    """The mock engine for local URLs, the fake La Plateforme for hosted ones."""

    def __init__(self, world: World, fake: FakePlateforme) -> None:
        self.world, self.fake = world.transport(), httpx.ASGITransport(app=create_app(fake))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if str(request.url).startswith(HOSTED):
            return await self.fake.handle_async_request(request)
        return await self.world.handle_async_request(request)


def _fake(**kw: Any) -> FakePlateforme:
    fake = FakePlateforme(api_key=HOSTED_KEY, models=["mistral-small-latest"])
    for k, v in kw.items():
        setattr(fake, k, v)
    return fake


async def _usage(c: Any) -> dict[str, dict[str, Any]]:
    got = (await c["alice"]._client.get("http://gw/v1/usage?group_by=route",
                                        headers={"authorization": f"Bearer {ALICE}"})).json()
    return {g["route"]: g for g in got["data"]}


async def test_deadline_remainder_goes_as_one_mistral_batch_job(tmp_path: Path) -> None:
    world, fake = World(), _fake(job_s=0.3)

    async def slow_local(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.4)
        return httpx.Response(200, json=completion("demo", "local answer"))

    world.local = slow_local  # type: ignore[assignment]
    async with _app(tmp_path, world, transport=_Both(world, fake), local_concurrency=1) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(12))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="4s")  # type: ignore[arg-type]
        done = await _until(c["alice"], b.id, {"completed", "expired", "failed"})
        assert done.status == "completed", done
        out = await _lines(c["alice"], done.output_file_id)
        usage = await _usage(c)
    assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(12))
    answers = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"]
               for x in out}
    hosted = {cid for cid, a in answers.items() if a.startswith("hosted reply to:")}
    assert hosted and len(hosted) < 12
    # Each hosted line got the answer to its own request (custom_ids mapped back).
    assert all(answers[cid] == f"hosted reply to: {cid}" for cid in hosted)
    # The remainder as batch jobs (one at a time: a later look at the pace may send a
    # second), as Mistral documents them; no ordinary hosted calls.
    assert fake.requests_to("/v1/chat/completions") == []
    jobs = fake.requests_to("/v1/batch/jobs")
    assert jobs and fake.counters.get("rejected", 0) == 0
    for job in (r.body for r in jobs):
        assert job["model"] == "mistral-small-latest"
        assert job["endpoint"] == "/v1/chat/completions"
        assert job["metadata"]["spillover_batch"] == b.id
        # The token a restarted router finds the job by (test_batch_job_submission.py).
        assert set(job["metadata"]) == {"spillover_batch", "spillover_job"}
    assert all(j["status"] == "SUCCESS" for j in fake.jobs.values())
    assert sum(j["total_requests"] for j in fake.jobs.values()) == len(hosted)
    # One ledger row per hosted line, at the batch price with the job's own usage.
    row = usage["hosted"]
    assert row["requests"] == len(hosted)
    assert row["cost_usd"] == pytest.approx(
        (row["prompt_tokens"] * BATCH_PRICE[0] + row["completion_tokens"] * BATCH_PRICE[1])
        / 1e6)
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0


async def test_cancel_cancels_the_mistral_job(tmp_path: Path) -> None:
    world, fake = World(local_up=False), _fake(job_s=60.0)
    async with _app(tmp_path, world, transport=_Both(world, fake)) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(4))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="10s")  # type: ignore[arg-type]
        for _ in range(200):
            if fake.jobs:
                break
            await asyncio.sleep(0.05)
        assert fake.jobs, "no job was submitted"
        await c["alice"].batches.cancel(b.id)
        done = await _until(c["alice"], b.id, {"cancelled", "completed", "expired"})
        errors = await _lines(c["alice"], done.error_file_id)
    assert done.status == "cancelled"
    (job,) = fake.jobs.values()
    assert job["status"] == "CANCELLED"
    assert len(fake.requests_to(f"/v1/batch/jobs/{job['id']}/cancel")) == 1
    assert sorted(x["error"]["code"] for x in errors) == ["batch_cancelled"] * 4


async def test_restart_polls_the_job_again_instead_of_resubmitting(tmp_path: Path) -> None:
    world, fake = World(local_up=False), _fake(job_s=1.5)
    transport = _Both(world, fake)
    async with _app(tmp_path, world, transport=transport) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(5))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="10s")  # type: ignore[arg-type]
        for _ in range(200):
            if fake.jobs:
                break
            await asyncio.sleep(0.05)
    # Stopped with the job still running at La Plateforme.
    assert len(fake.jobs) == 1
    async with _app(tmp_path, world, transport=transport) as c:
        done = await _until(c["alice"], b.id, {"completed", "expired", "failed"})
        out = await _lines(c["alice"], done.output_file_id)
        usage = await _usage(c)
    assert done.status == "completed", done
    assert len(fake.requests_to("/v1/batch/jobs")) == 1 and len(fake.jobs) == 1
    assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(5)]
    assert usage["hosted"]["requests"] == 5


async def test_a_failed_job_leaves_its_lines_to_run_again(tmp_path: Path) -> None:
    world, fake = World(local_up=False), _fake(fail_jobs=True)
    async with _app(tmp_path, world, transport=_Both(world, fake)) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(3))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="3s")  # type: ignore[arg-type]
        for _ in range(200):
            if any(j["status"] == "FAILED" for j in fake.jobs.values()):
                break
            await asyncio.sleep(0.05)
        fake.fail_jobs = False  # the next job succeeds
        done = await _until(c["alice"], b.id, {"completed", "expired", "failed"})
        out = await _lines(c["alice"], done.output_file_id)
        usage = await _usage(c)
    statuses = sorted(j["status"] for j in fake.jobs.values())
    assert statuses[0] == "FAILED" and "SUCCESS" in statuses
    assert done.status == "completed", done
    assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(3)]
    assert usage["hosted"]["requests"] == 3  # the failed job booked nothing


async def test_a_job_carries_only_the_lines_the_callers_budget_can_hold(
        tmp_path: Path) -> None:
    """Each line of a La Plateforme batch job holds its worst case (at the batch price) before
    the job is sent, as a single hosted request does: with a budget for two and a half
    lines' worst case, the job carries two, the others expire unsent, and what was spent
    stays within the budget."""
    from router.app import Settings, create_app
    from router.config import Price
    from router.http.inbound import facts_for
    from router.routing.auth import key_digest
    from tests.unit.helpers import BASE_YAML, config

    body = {"model": "demo", "max_tokens": 8, "messages": [{"role": "user", "content": "req-0"}]}
    bound = facts_for("chat", body, {}).prompt_tokens_max
    worst = Price(input_per_mtok=BATCH_PRICE[0], output_per_mtok=BATCH_PRICE[1]).cost(bound, 8)
    budget = 2.5 * worst
    # La Plateforme bills each line its worst case: the prompt bound and all of max_tokens.
    world, fake = World(local_up=False), _fake(job_s=0.2, answer_words=50,
                                               prompt_tokens=lambda _body: bound)
    cfg = config(BASE_YAML.replace(
        "price: {input_per_mtok: 0.1, output_per_mtok: 0.3}",
        "price: {input_per_mtok: 0.1, output_per_mtok: 0.3}\n"
        "        batch_price: {input_per_mtok: 0.05, output_per_mtok: 0.15}"),
        callers={"alice": {"key_sha256": [key_digest(ALICE)],
                           "budget": {"daily_usd": budget}}},
        server={"request_timeout_s": 5, "metrics_interval_s": 60,
                "ledger_path": str(tmp_path / "ledger.db"),
                "ledger_spool_dir": str(tmp_path / "spool")},
        batches={"data_dir": str(tmp_path / "batches"), "poll_s": 0.05})
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}), config=cfg,
                     transport=_Both(world, fake))
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        alice = openai.AsyncOpenAI(api_key=ALICE, base_url="http://gw/v1", max_retries=0,
                                   http_client=http)  # type: ignore[arg-type]
        f = await alice.files.create(file=("in.jsonl", io.BytesIO(_jsonl(6))), purpose="batch")
        b = await alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                       completion_window="3s")  # type: ignore[arg-type]
        done = await _until(alice, b.id, {"completed", "expired", "failed"})
        out = await _lines(alice, done.output_file_id)
        errors = await _lines(alice, done.error_file_id)
        got = (await http.get("/v1/usage?group_by=route",
                              headers={"authorization": f"Bearer {ALICE}"})).json()
    hosted = {g["route"]: g for g in got["data"]}["hosted"]
    assert done.status == "expired", done
    assert sum(j["total_requests"] for j in fake.jobs.values()) == 2
    assert len(out) == 2 and len(errors) == 4
    assert all(x["error"]["code"] == "batch_expired" for x in errors)
    assert hosted["requests"] == 2
    assert hosted["cost_usd"] == pytest.approx(2 * worst)
    assert hosted["cost_usd"] <= budget


async def test_an_unreachable_budget_store_sends_no_job(tmp_path: Path) -> None:
    """The budget store does not answer: no La Plateforme job is submitted (nothing held,
    nothing spent); the lines stay unsent and expire at the deadline."""
    from router.accounting.ledger import StoreUnavailable
    from router.app import Settings, create_app
    from tests.unit.test_batch_api import _config

    world, fake = World(local_up=False), _fake(job_s=0.1)
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}),
                     config=_config(tmp_path), transport=_Both(world, fake))
    async with app.router.lifespan_context(app):
        async def unreachable(caller: str, amount_usd: float) -> None:
            raise StoreUnavailable("budget store unreachable")

        app.state.runtime.gateway.budgets.reserve = unreachable
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        alice = openai.AsyncOpenAI(api_key=ALICE, base_url="http://gw/v1", max_retries=0,
                                   http_client=http)  # type: ignore[arg-type]
        f = await alice.files.create(file=("in.jsonl", io.BytesIO(_jsonl(3))), purpose="batch")
        b = await alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                       completion_window="2s")  # type: ignore[arg-type]
        done = await _until(alice, b.id, {"completed", "expired", "failed"})
        errors = await _lines(alice, done.error_file_id)
    assert done.status == "expired", done
    assert fake.jobs == {} and fake.requests_to("/v1/batch/jobs") == []
    assert sorted(x["error"]["code"] for x in errors) == ["batch_expired"] * 3
