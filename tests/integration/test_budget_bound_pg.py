"""Spend never passes the budget: two router replicas on one PostgreSQL, many concurrent
requests (English, Chinese, code; with and without max_tokens; n > 1) to a fake La
Plateforme that bills prompts as Mistral's v3 tokenizer counts them and answers at length
when it is not told where to stop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import httpx
import psycopg
import yaml

from router.app import Settings, create_app
from router.config import parse_config
from tests.fakes.plateforme import DEFAULT_API_KEY, FakePlateforme, v3_prompt_tokens
from tests.fakes.plateforme import create_app as plateforme_app
from tests.unit.helpers import BASE_YAML, HOSTED, World

BUDGET_USD = 0.05
TEXTS = [
    "hi",
    "Summarise the budget rules of this gateway in two sentences, please.",
    "我们的预算必须是真正的上限，否则两个副本并发时会超支。",  # noqa: RUF001 - the characters are the point
    "def f(xs):\n    return {k: [v * 2 for v in xs if v] for k in range(3)}\n",
    "请把这段代码改写成 Rust：for (i, x) in enumerate(xs): print(i, x)",  # noqa: RUF001 - the characters are the point
]


def shared_config() -> Any:
    data = yaml.safe_load(BASE_YAML)
    data["server"]["database_url_env"] = "SPILLOVER_DB"
    # Prompts dominate the price, so a prompt counted short is an overspend.
    data["aliases"]["demo"]["hosted"][0]["price"] = {"input_per_mtok": 100.0,
                                                     "output_per_mtok": 10.0}
    data["budget"] = {"daily_usd": BUDGET_USD}
    data["routing"] = {"default_max_tokens": 64}
    return parse_config(yaml.safe_dump(data))


def bodies() -> list[dict[str, Any]]:
    out = []
    for i, (text, n) in enumerate(itertools.product(TEXTS, (1, 2))):
        body: dict[str, Any] = {"model": "demo", "n": n,
                                "messages": [{"role": "user", "content": text}]}
        if i % 2:
            body["max_tokens"] = 8
        out.append(body)
    return out


async def test_spend_stays_within_the_budget_across_two_replicas(pg_url: str) -> None:
    fake = FakePlateforme(prompt_tokens=v3_prompt_tokens, answer_words=300, latency_s=0.2)
    local = World(local_up=False).transport()
    hosted = httpx.AsyncClient(transport=httpx.ASGITransport(app=plateforme_app(fake)),
                               base_url="http://plateforme")

    async def handler(req: httpx.Request) -> httpx.Response:
        if not str(req.url).startswith(HOSTED):
            return local.handler(req)  # type: ignore[return-value]
        path = req.url.path.removeprefix("/v1")
        got = await hosted.post("/v1" + path, content=req.content,
                                headers={"authorization": f"Bearer {DEFAULT_API_KEY}",
                                         "content-type": "application/json"})
        return httpx.Response(got.status_code, content=got.content,
                              headers={"content-type": got.headers["content-type"]})

    env = {"MISTRAL_API_KEY": "sk-test-secret", "SPILLOVER_DB": pg_url}
    apps = [create_app(Settings(env=env), config=shared_config(),
                       transport=httpx.MockTransport(handler)) for _ in range(2)]
    asks = bodies() * 18  # 180 requests
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(hosted)
        clients = []
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
            clients.append(await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://router")))
        responses = await asyncio.gather(*(clients[i % 2].post("/v1/chat/completions",
                                                               json=body)
                                           for i, body in enumerate(asks)))
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert served, "nothing was served: the test would prove nothing"
    assert {r.json()["error"]["code"] for r in refused} <= {"budget_exceeded"}
    spent_headers = sum(float(r.headers["x-spillover-cost-usd"]) for r in served)
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT spent FROM budget_spend WHERE scope = 'global'"
                           " AND period = 'daily'").fetchone()
    assert row is not None
    assert float(row[0]) == spent_headers or abs(float(row[0]) - spent_headers) < 1e-9
    print(f"\nserved {len(served)} of {len(asks)}, spent ${spent_headers:.5f} of "
          f"${BUDGET_USD}")
    assert spent_headers <= BUDGET_USD
    # The fake billed what the tokenizer counts, and stopped where it was told to.
    for r in served:
        usage = r.json()["usage"]
        assert usage["completion_tokens"] <= 64 * len(r.json()["choices"])
    sent = [req.body for req in fake.requests_to("/v1/chat/completions")]
    assert all(b.get("max_tokens") in (8, 64) for b in sent)
