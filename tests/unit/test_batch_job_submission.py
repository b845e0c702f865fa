"""La Plateforme batch jobs submitted exactly once, and only with lines a single request
could send hosted.

Idempotent submission: the intent (a client-side token, also in the job's metadata) is
stored before the create call; a router that dies after the call, or never gets its answer,
finds the job again with GET /v1/batch/jobs filtered on that metadata and adopts it. Job
lines respect the caller's per-request limit (max_request_usd) as single requests do."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import openai
import pytest
from mistralai.client import Mistral

from router.providers.mistral_batch import MistralBatches
from tests.fakes.plateforme import create_app as fake_app
from tests.unit.helpers import HOSTED_KEY, World, completion
from tests.unit.test_batch_api import ALICE, _app, _jsonl, _lines, _until
from tests.unit.test_batch_mistral_jobs import _Both, _fake, _usage

_real_create = MistralBatches.create


def _creates(fake: Any) -> list[Any]:
    return [r for r in fake.requests_to("/v1/batch/jobs") if r.method == "POST"]


async def _submitted(fake: Any) -> None:
    for _ in range(400):
        if fake.jobs:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no job was submitted")


async def test_a_kill_right_after_the_create_call_adopts_the_job_on_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router stops dead right after La Plateforme created the job, before its id was
    stored (the create call never returns). The restarted router finds the job by its token
    and polls it: one job, every line answered once, each billed once."""
    world, fake = World(local_up=False), _fake(job_s=0.5)
    transport = _Both(world, fake)
    dead = asyncio.Event()

    async def create_then_die(self: MistralBatches, *args: Any, **kw: Any) -> Any:
        await _real_create(self, *args, **kw)
        dead.set()
        await asyncio.Event().wait()  # killed here: nothing after the call runs

    monkeypatch.setattr(MistralBatches, "create", create_then_die)
    async with _app(tmp_path, world, transport=transport) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(5))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="20s")  # type: ignore[arg-type]
        await asyncio.wait_for(dead.wait(), 10)
    (job,) = fake.jobs.values()
    token = job["metadata"]["spillover_job"]
    assert token.startswith("spillover-job-")
    assert job["metadata"]["spillover_batch"] == b.id
    monkeypatch.setattr(MistralBatches, "create", _real_create)
    async with _app(tmp_path, world, transport=transport) as c:
        done = await _until(c["alice"], b.id, {"completed", "expired", "failed"})
        out = await _lines(c["alice"], done.output_file_id)
        usage = await _usage(c)
    assert done.status == "completed", done
    assert len(_creates(fake)) == 1 and len(fake.jobs) == 1
    assert job["status"] == "SUCCESS" and job["total_requests"] == 5
    # The restart asked for the job by its token, as Mistral's list-jobs filter takes it.
    lookups = [r for r in fake.requests_to("/v1/batch/jobs") if r.method == "GET"]
    assert lookups and fake.counters.get("rejected", 0) == 0
    assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(5)]
    assert fake.requests_to("/v1/chat/completions") == []
    assert usage["hosted"]["requests"] == 5


async def test_an_unanswered_create_adopts_the_job_it_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The create call times out after La Plateforme made the job: the router does not send
    the lines again, it finds the job by its token and uses it."""
    world, fake = World(local_up=False), _fake(job_s=0.3)

    async def create_then_time_out(self: MistralBatches, *args: Any, **kw: Any) -> Any:
        await _real_create(self, *args, **kw)
        raise httpx.ReadTimeout("no answer")

    monkeypatch.setattr(MistralBatches, "create", create_then_time_out)
    async with _app(tmp_path, world, transport=_Both(world, fake)) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(4))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="20s")  # type: ignore[arg-type]
        done = await _until(c["alice"], b.id, {"completed", "expired", "failed"})
        out = await _lines(c["alice"], done.output_file_id)
        usage = await _usage(c)
    assert done.status == "completed", done
    assert len(_creates(fake)) == 1 and len(fake.jobs) == 1
    assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(4)]
    assert usage["hosted"]["requests"] == 4


async def test_a_create_that_never_reached_la_plateforme_is_sent_again_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The create call fails before La Plateforme saw it: the lookup finds no job, the
    lines go back to pending and the next turn submits them; one job in all."""
    world, fake = World(local_up=False), _fake(job_s=0.2)
    failed = []

    async def fail_once(self: MistralBatches, *args: Any, **kw: Any) -> Any:
        if not failed:
            failed.append(1)
            raise httpx.ConnectError("unreachable")
        return await _real_create(self, *args, **kw)

    monkeypatch.setattr(MistralBatches, "create", fail_once)
    async with _app(tmp_path, world, transport=_Both(world, fake)) as c:
        f = await c["alice"].files.create(file=("in.jsonl", io.BytesIO(_jsonl(3))),
                                          purpose="batch")
        b = await c["alice"].batches.create(input_file_id=f.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="20s")  # type: ignore[arg-type]
        done = await _until(c["alice"], b.id, {"completed", "expired", "failed"})
        out = await _lines(c["alice"], done.output_file_id)
    assert done.status == "completed", done
    assert failed and len(_creates(fake)) == 1 and len(fake.jobs) == 1
    (job,) = fake.jobs.values()
    assert job["total_requests"] == 3
    assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(3)]


async def test_the_job_lookup_sends_what_mistrals_sdk_sends() -> None:
    """GET /v1/batch/jobs with a metadata filter: the same query as the mistralai SDK's
    (generated from Mistral's API description) for the same filter."""
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={"object": "list", "total": 0, "data": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        found = await MistralBatches(http, "https://api.mistral.ai/v1", "k").find(
            {"spillover_job": "spillover-job-abc"})
    assert found is None
    sdk = Mistral(api_key="k", server_url="https://api.mistral.ai",
                  client=httpx.Client(transport=httpx.MockTransport(handler)))
    sdk.batch.jobs.list(metadata={"spillover_job": "spillover-job-abc"})
    ours, theirs = seen
    assert ours.path == theirs.path == "/v1/batch/jobs"
    assert sorted(parse_qsl(urlsplit(str(ours)).query)) == sorted(
        parse_qsl(urlsplit(str(theirs)).query))


async def test_the_fake_lists_jobs_by_metadata_and_validates_the_query() -> None:
    fake = _fake()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake_app(fake)),
                                 base_url="http://fake") as http:
        auth = {"authorization": f"Bearer {HOSTED_KEY}"}
        up = await http.post("/v1/files", headers=auth, data={"purpose": "batch"}, files={
            "file": ("a.jsonl", b'{"custom_id": "1", "body": {"messages": []}}\n')})
        ids = []
        for tag in ("a", "b"):
            r = await http.post("/v1/batch/jobs", headers=auth, json={
                "input_files": [up.json()["id"]], "model": "mistral-small-latest",
                "endpoint": "/v1/chat/completions", "metadata": {"tag": tag}})
            ids.append(r.json()["id"])
        got = await http.get("/v1/batch/jobs?tag=b&created_by_me=false", headers=auth)
        assert got.status_code == 200
        assert [j["id"] for j in got.json()["data"]] == [ids[1]]
        every = await http.get("/v1/batch/jobs", headers=auth)
        assert [j["id"] for j in every.json()["data"]] == ids[::-1]  # newest first
        oldest = await http.get("/v1/batch/jobs?order_by=created&page_size=1", headers=auth)
        assert [j["id"] for j in oldest.json()["data"]] == ids[:1]
        for bad in ("page=-1", "page_size=x", "status=DONE", "order_by=new",
                    "created_by_me=maybe", "created_after=yesterday"):
            r = await http.get(f"/v1/batch/jobs?{bad}", headers=auth)
            assert r.status_code == 422, bad
            assert r.json()["message"]["detail"][0]["loc"][0] == "query", bad


_SMALL = {"model": "demo", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
_BIG = {**_SMALL, "max_tokens": 1500}


def _limit_between() -> float:
    """A max_request_usd between the small and the big line's worst case at the batch
    price (the prompt's bound and all of max_tokens)."""
    from router.http.inbound import facts_for

    worst = [facts_for("chat", body, {}).prompt_tokens_max * 0.05e-6
             + int(body["max_tokens"]) * 0.15e-6 for body in (_SMALL, _BIG)]
    assert worst[0] < worst[1]
    return (worst[0] + worst[1]) / 2


async def _run_limited(tmp_path: Path, world: World, fake: Any, *, local: bool,
                       n: int, window: str) -> dict[str, Any]:
    """A batch of alternating small and big lines from a caller whose max_request_usd lies
    between them, and the same big line sent on its own at the batch class."""
    from router.app import Settings, create_app
    from router.routing.auth import key_digest
    from tests.unit.helpers import BASE_YAML, config

    text = BASE_YAML.replace(
        "price: {input_per_mtok: 0.1, output_per_mtok: 0.3}",
        "price: {input_per_mtok: 0.1, output_per_mtok: 0.3}\n"
        "        batch_price: {input_per_mtok: 0.05, output_per_mtok: 0.15}")
    if not local:  # a hosted-only alias: nothing may take a line hosted cannot
        text = text[:text.index("    local:")] + text[text.index("    hosted:"):]
    cfg = config(text, callers={"alice": {"key_sha256": [key_digest(ALICE)],
                                          "max_request_usd": _limit_between()}},
                 server={"request_timeout_s": 5, "metrics_interval_s": 60,
                         "ledger_path": str(tmp_path / "ledger.db"),
                         "ledger_spool_dir": str(tmp_path / "spool")},
                 batches={"data_dir": str(tmp_path / "batches"), "poll_s": 0.05,
                          "local_concurrency": 1})
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}), config=cfg,
                     transport=_Both(world, fake))
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": _BIG if i % 2 else _SMALL} for i in range(n)]
    data = "\n".join(json.dumps(x) for x in lines).encode() + b"\n"
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        alice = openai.AsyncOpenAI(api_key=ALICE, base_url="http://gw/v1", max_retries=0,
                                   http_client=http)  # type: ignore[arg-type]
        single = await http.post("/v1/chat/completions", json=_BIG, headers={
            "authorization": f"Bearer {ALICE}", "x-spillover-priority": "batch",
            "x-spillover-route": "hosted"})
        f = await alice.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        b = await alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                       completion_window=window)  # type: ignore[arg-type]
        done = await _until(alice, b.id, {"completed", "expired", "failed"})
        return {"done": done, "single": single,
                "out": await _lines(alice, done.output_file_id),
                "errors": await _lines(alice, done.error_file_id) if done.error_file_id
                else [],
                # A job line's custom_id is its line number (1-based) in the batch's file.
                "sent": sorted(f"req-{int(line['custom_id']) - 1}" for job in fake.jobs.values()
                               for line in _job_input(fake, job))}


async def test_a_line_over_the_per_request_limit_fails_as_a_single_request_would(
        tmp_path: Path) -> None:
    """Hosted only: a line whose worst case is over the caller's max_request_usd is not sent
    in the job; it fails with the very error the same request gets on its own (400
    cost_limit). The lines under the limit go in the job."""
    got = await _run_limited(tmp_path, World(local_up=False), _fake(job_s=0.2), local=False,
                             n=6, window="10s")
    single = got["single"]
    assert single.status_code == 400 and single.json()["error"]["code"] == "cost_limit"
    assert got["done"].status == "completed", got["done"]
    assert got["sent"] == ["req-0", "req-2", "req-4"]
    assert sorted(x["custom_id"] for x in got["out"]) == ["req-0", "req-2", "req-4"]
    assert sorted(x["custom_id"] for x in got["errors"]) == ["req-1", "req-3", "req-5"]
    for x in got["errors"]:
        assert x["response"]["status_code"] == 400
        assert x["response"]["body"]["error"] == single.json()["error"]


async def test_a_line_over_the_per_request_limit_stays_local(tmp_path: Path) -> None:
    """With a local engine (slow, so the deadline sends a remainder to a job): the big lines
    are never in a job, they run locally; the job carries small lines only."""
    world, fake = World(), _fake(job_s=0.2)

    async def slow_local(req: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.4)
        return httpx.Response(200, json=completion("demo", "local answer"))

    world.local = slow_local  # type: ignore[assignment]
    got = await _run_limited(tmp_path, world, fake, local=True, n=12, window="4s")
    assert got["single"].status_code == 400  # forced hosted, it may not go
    assert got["done"].status == "completed", got["done"]
    assert got["sent"], "the deadline sent no job"
    assert all(int(cid.removeprefix("req-")) % 2 == 0 for cid in got["sent"])
    answers = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"]
               for x in got["out"]}
    assert sorted(answers) == sorted(f"req-{i}" for i in range(12))
    assert all(answers[f"req-{i}"] == "local answer" for i in range(1, 12, 2))


def _job_input(fake: Any, job: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(x) for f in job["input_files"]
            for x in fake.files[f]["content"].splitlines() if x.strip()]
