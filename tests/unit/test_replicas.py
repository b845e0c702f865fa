"""Engine replicas found by DNS: several stand-in engines (one MockTransport handler per
address) behind a resolver the test controls; conversations kept on their replica."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from router.app import Settings, create_app
from router.errors import InvalidRequest
from router.http.inbound import session_header
from router.routing.catalog import Catalog
from router.routing.load import LoadMonitor
from router.routing.policy import EngineLoad
from router.routing.replicas import choose, conversation_key, session_key
from router.routing.resilience import Breakers
from tests.unit.helpers import HOSTED, METRICS_IDLE, Clock, chunk, completion, config, sse

PORT = 8102
DNS = "vllm-small.spillover.svc.cluster.local"
YAML = f"""
server: {{request_timeout_s: 5, metrics_interval_s: 60, discover_interval_s: 60,
          ledger_path: ":memory:"}}
providers:
  mistral: {{kind: mistral, base_url: "{HOSTED}", api_key_env: MISTRAL_API_KEY,
            timeouts: {{connect: 1, read: 2, write: 1, pool: 1}}}}
aliases:
  small:
    local:
      - name: small
        model: mistralai/Mistral-Small-3.2-24B-Instruct-2506
        license: apache-2.0
        discover: {DNS}
        port: {PORT}
        saturation: {{max_waiting: 0, max_inflight: 2, resume_below: 0.5}}
    hosted:
      - provider: mistral
        model: mistral-small-latest
        price: {{input_per_mtok: 0.1, output_per_mtok: 0.3}}
"""


@dataclass
class Fleet:
    """Stand-in engines at 10.0.0.N:8102 and the DNS answer the router gets."""

    answer: list[str] | OSError = field(default_factory=lambda: ["10.0.0.1", "10.0.0.2"])
    down: set[str] = field(default_factory=set)
    # Replicas whose /health answers but whose requests fail: "500", "reset" or "400".
    failing: dict[str, str] = field(default_factory=dict)
    served: list[tuple[str, str]] = field(default_factory=list)  # (address, first message)
    lookups: int = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        assert (host, port) == (DNS, PORT)
        self.lookups += 1
        if isinstance(self.answer, OSError):
            raise self.answer
        return list(self.answer)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    def _handle(self, req: httpx.Request) -> httpx.Response:
        host = req.url.host
        if req.url.host == "api.mistral.test":
            body = json.loads(req.content)
            return httpx.Response(200, json=completion(body["model"], "hosted answer"))
        if host in self.down or req.url.port != PORT:
            raise httpx.ConnectError("connection refused", request=req)
        if req.url.path == "/health":
            return httpx.Response(200)
        if req.url.path == "/metrics":
            return httpx.Response(200, text=METRICS_IDLE % {"waiting": 0, "kv": 0.1})
        if self.failing.get(host) == "500":
            return httpx.Response(500, json={"error": {"message": "engine error"}})
        if self.failing.get(host) == "400":
            return httpx.Response(400, json={"error": {"message": "bad request"}})
        if self.failing.get(host) == "reset":
            raise httpx.ReadError("connection reset by peer", request=req)
        body = json.loads(req.content)
        self.served.append((host, body["messages"][0]["content"]))
        return httpx.Response(200, json=completion("small", f"from {host}"))


def monitor(fleet: Fleet, breakers: Breakers | None = None) -> LoadMonitor:
    client = httpx.AsyncClient(transport=fleet.transport())
    return LoadMonitor(client, Catalog(config(YAML)).all(), stale_s=60,
                       resolver=fleet.resolve, resolve_interval_s=60, breakers=breakers)


async def test_replicas_appear_and_disappear_with_the_dns_answer() -> None:
    fleet = Fleet()
    mon = monitor(fleet)
    await mon.refresh()
    assert mon.replicas("small") == ["10.0.0.1:8102", "10.0.0.2:8102"]
    status = mon.status()
    assert status["small"]["healthy_replicas"] == 2
    assert status["small@10.0.0.1:8102"]["healthy"] is True
    # The interval has not passed: no new lookup on an ordinary refresh.
    await mon.refresh()
    assert fleet.lookups == 1
    fleet.answer = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    await mon.resolve_now()
    assert mon.replicas("small") == ["10.0.0.1:8102", "10.0.0.2:8102", "10.0.0.3:8102"]
    assert mon.view(["small"])["small"].healthy
    fleet.answer = ["10.0.0.3"]
    await mon.resolve_now()
    assert mon.replicas("small") == ["10.0.0.3:8102"]
    assert "small@10.0.0.1:8102" not in mon.status()
    # A failed lookup is not an empty answer: the replicas known stay.
    fleet.answer = OSError("temporary failure in name resolution")
    await mon.resolve_now()
    assert mon.replicas("small") == ["10.0.0.3:8102"]
    # Every replica gone: the deployment is down (routing spills), and says why.
    fleet.answer = []
    await mon.resolve_now()
    assert mon.replicas("small") == []
    assert not mon.view()["small"].healthy
    assert "resolves to no replica" in str(mon.status()["small"]["down_reason"])
    assert mon.pick("small", None) is None
    fleet.answer = ["10.0.0.2"]
    await mon.resolve_now()
    assert mon.view()["small"].healthy


async def test_each_replica_has_its_own_health_and_load() -> None:
    fleet = Fleet(down={"10.0.0.2"})
    mon = monitor(fleet)
    await mon.refresh()
    status = mon.status()
    assert status["small@10.0.0.1:8102"]["healthy"] is True
    assert status["small@10.0.0.2:8102"]["healthy"] is False
    assert mon.view()["small"].healthy  # one replica answering is enough
    for key in (f"conv-{i}" for i in range(20)):
        picked = mon.pick("small", key)
        assert picked is not None and picked[0] == "10.0.0.1:8102"
        assert picked[1] == "http://10.0.0.1:8102/v1"
    # In-flight requests saturate one replica; the deployment only when all are.
    fleet.down.clear()
    await mon.refresh()
    mon.acquire("small", "10.0.0.1:8102")
    mon.acquire("small", "10.0.0.1:8102")
    view = mon.view()["small"]
    assert not view.saturated and view.inflight == 2
    assert mon.status()["small@10.0.0.1:8102"]["saturated"] is True
    assert all(mon.pick("small", f"c{i}")[0] == "10.0.0.2:8102"  # type: ignore[index]
               for i in range(10))
    mon.acquire("small", "10.0.0.2:8102")
    mon.acquire("small", "10.0.0.2:8102")
    assert mon.view()["small"].saturated
    # A failed connect marks that replica down at once, not its sibling.
    mon.release("small", "10.0.0.2:8102")
    mon.release("small", "10.0.0.2:8102")
    mon.mark_down("small", "connect failed", "10.0.0.2:8102")
    assert mon.status()["small@10.0.0.2:8102"]["healthy"] is False
    assert mon.status()["small@10.0.0.1:8102"]["healthy"] is True


def load(inflight: int = 0, *, healthy: bool = True, saturated: bool = False) -> EngineLoad:
    return EngineLoad(healthy=healthy, saturated=saturated, score=inflight / 8,
                      inflight=inflight)


def test_a_conversation_keeps_its_replica_and_moves_when_it_must() -> None:
    names = ["a:1", "b:1", "c:1"]
    idle = [(n, load()) for n in names]
    home = choose(idle, "k")
    assert home is not None and home.why == "affinity"
    # Stable, and spread: 300 keys land on every replica, none on more than half.
    homes = [choose(idle, f"k{i}").replica for i in range(300)]  # type: ignore[union-attr]
    assert all(0 < homes.count(n) < 150 for n in names)
    for state, word in (({"healthy": False}, "down"), ({"saturated": True}, "saturated")):
        moved = choose([(n, load(**state) if n == home.replica else load())  # type: ignore[arg-type]
                        for n in names], "k")
        assert moved is not None and moved.replica != home.replica
        assert moved.why.startswith(f"affinity-moved ({home.replica}: {word}")
    # Bounded load: a home far above an even share gives the conversation up.
    hot = choose([(n, load(6) if n == home.replica else load(0)) for n in names], "k")
    assert hot is not None and hot.replica != home.replica and "over its share" in hot.why
    # No key: least loaded.
    least = choose([("a:1", load(3)), ("b:1", load(1)), ("c:1", load(2))], None)
    assert least is not None and (least.replica, least.why) == ("b:1", "least-loaded")


def test_a_conversation_stays_home_behind_a_few_requests_at_low_load() -> None:
    names = ["a:1", "b:1", "c:1", "d:1"]
    home = choose([(n, load()) for n in names], "k").replica  # type: ignore[union-attr]
    # An even share of 1-3 requests over 4 replicas rounds up to 1: without the floor the
    # conversation left its warm replica as soon as that one ran a single request.
    for busy in (1, 2, 3):
        stay = choose([(n, load(busy) if n == home else load()) for n in names], "k")
        assert stay is not None and (stay.replica, stay.why) == (home, "affinity")
    moved = choose([(n, load(4) if n == home else load()) for n in names], "k")
    assert moved is not None and moved.replica != home
    assert moved.why == f"affinity-moved ({home}: over its share (4 in flight, bound 4))"


def test_a_new_replica_takes_conversations_only_for_itself() -> None:
    before = [(n, load()) for n in ("a:1", "b:1", "c:1")]
    after = [*before, ("d:1", load())]
    moved = 0
    for i in range(400):
        old = choose(before, f"k{i}").replica  # type: ignore[union-attr]
        new = choose(after, f"k{i}").replica  # type: ignore[union-attr]
        if old != new:
            moved += 1
            assert new == "d:1"  # nobody else's conversations reshuffle
    assert 40 < moved < 180  # about a quarter move to the newcomer


def test_conversation_key_is_the_caller_and_the_opening() -> None:
    turn1 = {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "plan a trip"}]}
    turn3 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": "to Lyon"}]}
    assert conversation_key("app", turn1) == conversation_key("app", turn3)
    assert conversation_key("app", turn1) != conversation_key("other", turn1)
    other = {"messages": [{"role": "user", "content": "another chat"}]}
    assert conversation_key("app", other) != conversation_key("app", turn1)
    assert conversation_key("app", {"prompt": "x" * 2000}) == conversation_key(
        "app", {"prompt": "x" * 2000 + "more"})
    assert conversation_key("app", {"input": "embed me"}) is None


@pytest.fixture
async def served() -> AsyncIterator[tuple[httpx.AsyncClient, Fleet]]:
    fleet = Fleet(answer=["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}), config=config(YAML),
                     transport=fleet.transport(), resolver=fleet.resolve)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        yield c, fleet


async def test_the_router_serves_each_conversation_from_its_replica(
        served: tuple[httpx.AsyncClient, Fleet]) -> None:
    client, fleet = served
    for turn in range(3):
        for conv in range(12):
            messages = [{"role": "user", "content": f"conversation {conv}"}]
            messages += [{"role": "assistant", "content": "a"},
                         {"role": "user", "content": "more"}] * turn
            r = await client.post("/v1/chat/completions",
                                  json={"model": "small", "messages": messages})
            assert r.status_code == 200, r.text
            assert r.headers["x-spillover-route"] == "local"
            assert r.headers["x-spillover-backend"] == "small"
    where: dict[str, set[str]] = {}
    for host, first in fleet.served:
        where.setdefault(first, set()).add(host)
    assert len(where) == 12 and all(len(hosts) == 1 for hosts in where.values())
    assert len({h for hosts in where.values() for h in hosts}) >= 2  # spread, not one
    status = (await client.get("/status")).json()
    assert status["engines"]["small"]["replicas"] == [
        "10.0.0.1:8102", "10.0.0.2:8102", "10.0.0.3:8102"]
    metrics = (await client.get("/metrics")).text
    assert 'spillover_engine_healthy{alias="small",engine="small@10.0.0.2:8102"} 1.0' in (
        metrics)


async def test_a_replica_that_refuses_is_left_and_its_conversation_moves(
        served: tuple[httpx.AsyncClient, Fleet]) -> None:
    client, fleet = served
    chat = {"model": "small", "messages": [{"role": "user", "content": "conversation x"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    home = fleet.served[-1][0]
    fleet.down.add(home)
    r = await client.post("/v1/chat/completions", json=chat)
    # The connect failure marks that replica down; this request is retried on a sibling
    # (not spilled hosted), and so is the next one.
    assert r.status_code == 200
    assert r.headers["x-spillover-route"] == "local" and fleet.served[-1][0] != home
    assert (await client.get("/status")).json()["engines"][f"small@{home}:8102"][
        "healthy"] is False
    r = await client.post("/v1/chat/completions", json=chat)
    assert r.headers["x-spillover-route"] == "local"
    assert fleet.served[-1][0] != home


async def test_explain_names_the_replica_and_why(
        served: tuple[httpx.AsyncClient, Fleet]) -> None:
    client, fleet = served
    chat = {"model": "small", "messages": [{"role": "user", "content": "conversation y"}]}
    r = await client.post("/v1/route/explain", json=chat)
    assert r.status_code == 200, r.text
    choice = r.json()["plan"]["replicas"]["small"]
    assert choice["why"] == "affinity" and choice["affinity"] is True
    assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    assert choice["replica"] == f"{fleet.served[-1][0]}:8102"  # explain said where it went
    fleet.down.add(fleet.served[-1][0])
    status = await client.post("/v1/chat/completions", json=chat)  # marks it down
    assert status.headers["x-spillover-route"] == "local"  # served by a sibling
    moved = (await client.post("/v1/route/explain", json=chat)).json()["plan"]["replicas"][
        "small"]
    assert moved["replica"] != choice["replica"]
    assert moved["why"] == f"affinity-moved ({choice['replica']}: down)"


def test_session_header_is_bounded_validated_and_sent_once() -> None:
    assert session_header({}) is None
    assert session_header({"x-spillover-session": "  "}) is None  # a bare header
    assert session_header({"x-spillover-session": "Conv-7f3a:b/c+d=="}) == "Conv-7f3a:b/c+d=="
    assert session_header({"x-spillover-session": "abc, abc"}) == "abc"  # a proxy repeating it
    for bad in ("x" * 129, "has space", "naïve", "semi;colon", 'quote"'):
        with pytest.raises(InvalidRequest) as err:
            session_header({"x-spillover-session": bad})
        assert err.value.param == "x-spillover-session"
        assert bad not in str(err.value)
    assert session_header({"x-spillover-session": "x" * 128}) == "x" * 128
    with pytest.raises(InvalidRequest) as err:
        session_header({"x-spillover-session": "one,two"})
    assert err.value.code == "conflicting_headers"


def test_session_key_is_a_digest_of_the_caller_and_the_id() -> None:
    key = session_key("app", "conv-42")
    assert "conv-42" not in key
    assert key == session_key("app", "conv-42")
    assert key != session_key("other", "conv-42")  # two callers' equal ids: two conversations
    assert key != session_key("app", "Conv-42")
    body = {"messages": [{"role": "user", "content": "conv-42"}]}
    assert key != conversation_key("app", body)


async def test_a_session_header_keeps_a_conversation_whatever_its_body(
        served: tuple[httpx.AsyncClient, Fleet]) -> None:
    client, fleet = served
    secret = "session-id-not-to-be-kept"
    for turn in range(3):
        for conv in range(12):
            # Every turn opens differently (a client that rewrites its system prompt): the
            # body's key would scatter it; the header keeps it together.
            chat = {"model": "small",
                    "messages": [{"role": "user", "content": f"turn {turn} of {conv}"}]}
            r = await client.post("/v1/chat/completions", json=chat,
                                  headers={"x-spillover-session": f"{secret}-{conv}"})
            assert r.status_code == 200, r.text
            assert r.headers["x-spillover-route"] == "local"
    hosts = [host for host, _ in fleet.served]
    by_conv = [{hosts[turn * 12 + conv] for turn in range(3)} for conv in range(12)]
    assert all(len(h) == 1 for h in by_conv)
    assert len(set().union(*by_conv)) >= 2  # the sessions spread over the replicas
    # The header takes precedence: one body, twelve sessions, more than one replica.
    fleet.served.clear()
    same = {"model": "small", "messages": [{"role": "user", "content": "same opening"}]}
    for conv in range(12):
        r = await client.post("/v1/chat/completions", json=same,
                              headers={"x-spillover-session": f"{secret}-{conv}"})
        assert r.status_code == 200
    assert [host for host, _ in fleet.served] == [
        next(iter(h)) for h in by_conv]
    for path in ("/status", "/metrics"):
        assert secret not in (await client.get(path)).text


async def test_explain_says_the_session_keeps_the_conversation(
        served: tuple[httpx.AsyncClient, Fleet]) -> None:
    client, fleet = served
    chat = {"model": "small", "messages": [{"role": "user", "content": "conversation z"}]}
    r = await client.post("/v1/route/explain", json=chat,
                          headers={"x-spillover-session": "s-1"})
    assert r.status_code == 200, r.text
    assert "s-1" not in r.text
    choice = r.json()["plan"]["replicas"]["small"]
    assert choice["key"] == "session" and choice["why"] == "affinity"
    assert (await client.post("/v1/chat/completions", json=chat,
                              headers={"x-spillover-session": "s-1"})).status_code == 200
    assert choice["replica"] == f"{fleet.served[-1][0]}:8102"
    r = await client.post("/v1/route/explain", json=chat)
    assert r.json()["plan"]["replicas"]["small"]["key"] == "conversation"


async def test_a_malformed_session_header_is_refused_in_the_api_shape(
        served: tuple[httpx.AsyncClient, Fleet]) -> None:
    client, fleet = served
    chat = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}
    for value in ("x" * 200, "a b"):
        r = await client.post("/v1/chat/completions", json=chat,
                              headers={"x-spillover-session": value})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "x-spillover-session"
        assert err["type"] == "invalid_request_error"
        assert value not in r.text
    assert fleet.served == []


# -- each replica's own circuit breaker ---------------------------------------------------


def homed_on(mon: LoadMonitor, replica: str) -> str:
    """A conversation key whose home is `replica` while every replica is usable."""
    key = next(f"conv-{i}" for i in range(1000)
               if (mon.pick("small", f"conv-{i}") or ("",))[0] == replica)
    return key


async def test_a_replica_breaker_opens_skips_probes_and_closes() -> None:
    clock = Clock()
    breakers = Breakers(2, 30.0, clock)
    fleet = Fleet()
    mon = monitor(fleet, breakers)
    await mon.refresh()
    one, two = "10.0.0.1:8102", "10.0.0.2:8102"
    # Every replica found has its own breaker, closed, in the router's breakers.
    assert {n: b["state"] for n, b in breakers.snapshot().items()} == {
        f"small@{one}": "closed", f"small@{two}": "closed"}
    assert mon.status()[f"small@{one}"]["breaker"]["state"] == "closed"
    key = homed_on(mon, one)
    breakers.replica("small", one).failure()
    assert mon.pick("small", key)[0] == one  # type: ignore[index]  # one failure: not yet
    breakers.replica("small", one).failure()
    # Open: skipped by affinity (the conversation moves, saying why) and by least-loaded,
    # while its health probe still answers.
    moved = mon.pick("small", key)
    assert moved is not None and moved[0] == two
    assert moved[2].why == f"affinity-moved ({one}: circuit open, retry in 30 s)"
    assert all(mon.pick("small", None)[0] == two for _ in range(5))  # type: ignore[index]
    await mon.refresh()
    status = mon.status()
    assert status[f"small@{one}"]["healthy"] is True
    assert status[f"small@{one}"]["breaker"]["state"] == "open"
    assert mon.view()["small"].healthy  # the deployment: as good as its best replica
    # Half-open after the cool-down: the conversation goes home, as the one probe; while
    # it is out, nothing else is sent there.
    clock.advance(30)
    assert mon.pick("small", key)[0] == one  # type: ignore[index]
    mon.acquire("small", one)
    other = mon.pick("small", key)
    assert other is not None and other[0] == two
    assert other[2].why == f"affinity-moved ({one}: circuit half-open, probe in flight)"
    # The probe fails: open again for a fresh cool-down.
    mon.release("small", one)
    breakers.replica("small", one).failure()
    assert mon.pick("small", key)[0] == two  # type: ignore[index]
    clock.advance(29)
    assert mon.pick("small", key)[0] == two  # type: ignore[index]
    clock.advance(1)
    mon.acquire("small", one)
    mon.release("small", one)
    breakers.replica("small", one).success()  # the probe answered: closed
    assert mon.status()[f"small@{one}"]["breaker"]["state"] == "closed"
    assert mon.pick("small", key)[0] == one  # type: ignore[index]
    # A probe that ends without a verdict (the caller left) lets the next one go.
    for _ in range(2):
        breakers.replica("small", one).failure()
    clock.advance(30)
    mon.acquire("small", one)
    mon.release("small", one)
    assert mon.pick("small", key)[0] == one  # type: ignore[index]
    # Every replica open: the deployment is down to routing, and says why.
    for replica in (one, two):
        for _ in range(2):
            breakers.replica("small", replica).failure()
    assert not mon.view()["small"].healthy
    assert mon.status()["small"]["down_reason"] == (
        "every replica is down or its circuit is open")
    # DNS drops a replica: its breaker goes with it; back, it starts closed.
    fleet.answer = ["10.0.0.2"]
    await mon.resolve_now()
    assert f"small@{one}" not in breakers.snapshot()
    fleet.answer = ["10.0.0.1", "10.0.0.2"]
    await mon.resolve_now()
    assert breakers.snapshot()[f"small@{one}"]["state"] == "closed"
    assert breakers.snapshot()[f"small@{two}"]["state"] == "open"
    # Every replica gone: no breaker left for the deployment.
    fleet.answer = []
    await mon.resolve_now()
    assert breakers.snapshot() == {}


def test_a_hosted_name_with_an_at_sign_is_not_taken_for_a_replica() -> None:
    breakers = Breakers(2, 30.0, Clock())
    breakers.get("vertex:claude@2024")
    breakers.replica("claude", "10.0.0.1:8102")
    breakers.drop_replicas("claude")
    breakers.drop_replicas("vertex:claude")
    assert list(breakers.snapshot()) == ["vertex:claude@2024"]


@pytest.fixture
async def breaking(monkeypatch: pytest.MonkeyPatch,
                   ) -> AsyncIterator[tuple[httpx.AsyncClient, Fleet, Clock]]:
    """The served router, its breakers on a clock the test moves (2 failures open one for
    30 s)."""
    clock = Clock()
    real = Breakers.from_routing.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Breakers, "from_routing", classmethod(
        lambda cls, routing, clock_=clock: real(cls, routing, clock_)))
    fleet = Fleet(answer=["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    cfg = config(YAML + "routing: {breaker_failures: 2, breaker_cooldown_s: 30}\n")
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}), config=cfg,
                     transport=fleet.transport(), resolver=fleet.resolve)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        yield c, fleet, clock


async def test_a_replica_failing_while_healthy_is_opened_and_traffic_moves(
        breaking: tuple[httpx.AsyncClient, Fleet, Clock]) -> None:
    client, fleet, clock = breaking
    chat = {"model": "small", "messages": [{"role": "user", "content": "conversation b"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    home = fleet.served[-1][0]
    name = f"small@{home}:8102"
    # Its /health answers; its requests fail: a 500, then a reset. Each is retried on a
    # sibling replica (not spilled hosted) and counts against that replica only.
    for kind in ("500", "reset"):
        fleet.failing[home] = kind
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "local"
        assert fleet.served[-1][0] != home
    status = (await client.get("/status")).json()
    assert status["breakers"][name]["state"] == "open"
    assert status["engines"][name]["healthy"] is True  # the probes see nothing wrong
    assert status["engines"][name]["breaker"]["state"] == "open"
    assert all(b["state"] == "closed" for n, b in status["breakers"].items() if n != name)
    ready = (await client.get("/readyz")).json()
    assert ready["engines"][name]["breaker"]["state"] == "open"
    metrics = (await client.get("/metrics")).text
    assert f'spillover_breaker_state{{upstream="{name}"}} 2.0' in metrics
    explain = (await client.post("/v1/route/explain", json=chat)).json()
    assert explain["breakers"][name]["state"] == "open"
    assert explain["plan"]["replicas"]["small"]["why"] == (
        f"affinity-moved ({home}:8102: circuit open, retry in 30 s)")
    # Skipped: this conversation and every other one go to the other replicas, locally.
    fleet.served.clear()
    for conv in ["b", *range(12)]:
        chat_n = {"model": "small",
                  "messages": [{"role": "user", "content": f"conversation {conv}"}]}
        r = await client.post("/v1/chat/completions", json=chat_n)
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "local"
    assert len(fleet.served) == 13 and home not in {h for h, _ in fleet.served}
    # Mended, and the open period over: the next request home is the probe, it answers,
    # the breaker closes and the conversation is back on its warm replica.
    del fleet.failing[home]
    clock.advance(29)
    r = await client.post("/v1/chat/completions", json=chat)
    assert fleet.served[-1][0] != home
    clock.advance(1)
    r = await client.post("/v1/chat/completions", json=chat)
    assert r.headers["x-spillover-route"] == "local" and fleet.served[-1][0] == home
    status = (await client.get("/status")).json()
    assert status["breakers"][name]["state"] == "closed"
    explain = (await client.post("/v1/route/explain", json=chat)).json()
    assert explain["plan"]["replicas"]["small"]["why"] == "affinity"


async def test_a_failed_probe_opens_the_replica_again_and_4xx_do_not_count(
        breaking: tuple[httpx.AsyncClient, Fleet, Clock]) -> None:
    client, fleet, clock = breaking
    chat = {"model": "small", "messages": [{"role": "user", "content": "conversation p"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    home = fleet.served[-1][0]
    name = f"small@{home}:8102"
    fleet.failing[home] = "500"
    for _ in range(2):
        await client.post("/v1/chat/completions", json=chat)
    clock.advance(30)
    r = await client.post("/v1/chat/completions", json=chat)  # the probe: 500 again
    assert r.headers["x-spillover-route"] == "local" and fleet.served[-1][0] != home
    breaker = (await client.get("/status")).json()["breakers"][name]
    assert breaker["state"] == "open" and breaker["retry_in_s"] == 30.0
    del fleet.failing[home]
    clock.advance(30)
    r = await client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200 and fleet.served[-1][0] == home
    assert (await client.get("/status")).json()["breakers"][name]["state"] == "closed"
    # A caller's bad request answered by the replica says nothing against it.
    fleet.failing[home] = "400"
    for _ in range(3):
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400
    assert (await client.get("/status")).json()["breakers"][name]["state"] == "closed"


async def test_a_reload_without_the_deployment_drops_its_replica_breakers() -> None:
    breakers = Breakers(2, 30.0, Clock())
    breakers.replica("retired", "10.0.0.9:8102").failure()
    breakers.get("mistral:mistral-small-latest")
    breakers.replica("small", "10.0.0.1:8102").failure()
    fleet = Fleet()
    mon = monitor(fleet, breakers)  # the monitor a reload builds, over the kept breakers
    assert set(breakers.snapshot()) == {"mistral:mistral-small-latest", "small@10.0.0.1:8102"}
    await mon.refresh()
    snap = breakers.snapshot()
    assert set(snap) == {"mistral:mistral-small-latest", "small@10.0.0.1:8102",
                         "small@10.0.0.2:8102"}
    assert snap["small@10.0.0.1:8102"]["consecutive_failures"] == 1  # kept across it


# -- failover among the replicas of one deployment ----------------------------------------


@dataclass
class FlakyFleet(Fleet):
    """The fleet, plus replicas that refuse a request's connection while their /health
    answers ("refuse"), streams that break after their first event ("break"), embeddings
    (a request with no conversation key), and every request that reaches the hosted fake."""

    hosted: list[str] = field(default_factory=list)
    streamed: list[str] = field(default_factory=list)  # hosts a stream was opened on
    embedded: list[str] = field(default_factory=list)  # hosts embeddings were asked of
    breaking: set[str] = field(default_factory=set)  # replicas whose streams break

    def _handle(self, req: httpx.Request) -> httpx.Response:
        host = req.url.host
        if host == "api.mistral.test":
            self.hosted.append(req.url.path)
        elif req.url.path.startswith("/v1/") and host not in self.down:
            if self.failing.get(host) == "refuse":
                raise httpx.ConnectError("connection refused", request=req)
            body = json.loads(req.content)
            if req.url.path == "/v1/embeddings":
                self.embedded.append(host)
                return httpx.Response(200, json={
                    "object": "list", "model": "small",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "usage": {"prompt_tokens": 2, "total_tokens": 2}})
            if body.get("stream") and not self.failing.get(host):
                self.streamed.append(host)
                return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                      stream=_BreakingStream(host in self.breaking))
        return super()._handle(req)


class _BreakingStream(httpx.AsyncByteStream):
    """An engine's stream: a first event, then either the rest or a reset connection."""

    def __init__(self, breaks: bool) -> None:
        self._breaks = breaks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield sse([chunk("small", "first")]).removesuffix(b"data: [DONE]\n\n")
        if self._breaks:
            raise httpx.ReadError("connection reset by peer")
        yield sse([chunk("small", " rest", usage=(3, 2))])


@contextlib.asynccontextmanager
async def flaky_router(fleet: FlakyFleet, routing: str = "", yaml: str = YAML,
                       ) -> AsyncIterator[httpx.AsyncClient]:
    cfg = config(yaml + (f"routing: {{{routing}}}\n" if routing else ""))
    app = create_app(Settings(env={"MISTRAL_API_KEY": "sk-test-secret"}), config=cfg,
                     transport=fleet.transport(), resolver=fleet.resolve)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
        yield c


THREE = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


@pytest.mark.parametrize("kind", ["refuse", "reset", "500"])
async def test_a_request_failing_on_a_replica_is_retried_on_a_sibling_not_hosted(
        kind: str) -> None:
    fleet = FlakyFleet(answer=list(THREE))
    async with flaky_router(fleet) as client:
        chat = {"model": "small", "messages": [{"role": "user", "content": "conversation f"}]}
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        home = fleet.served[-1][0]
        fleet.failing[home] = kind  # its /health still answers
        await client.get("/readyz")
        plan = (await client.post("/v1/route/explain", json=chat)).json()["plan"]
        choice = plan["replicas"]["small"]
        # Explain names the replica and the sibling a failure there would move it to.
        assert choice["replica"] == f"{home}:8102" and choice["why"] == "affinity"
        (sibling,) = choice["failover"]
        assert sibling != choice["replica"]
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == f"from {sibling[:-5]}"
        assert r.headers["x-spillover-route"] == "local"
        assert r.headers["x-spillover-reason"] == (
            "local-down" if kind == "refuse" else "local-error")
        assert fleet.hosted == []  # nothing paid for
        status = (await client.get("/status")).json()
        # The request's record names both replicas, in the order they were tried.
        assert status["recent"][0]["attempts"] == [f"small@{home}:8102", f"small@{sibling}"]
        assert status["breakers"][f"small@{home}:8102"]["consecutive_failures"] == 1
        assert status["breakers"][f"small@{sibling}"]["consecutive_failures"] == 0


async def test_a_stream_is_retried_on_a_sibling_before_its_first_byte() -> None:
    fleet = FlakyFleet(answer=list(THREE))
    async with flaky_router(fleet) as client:
        chat = {"model": "small", "stream": True,
                "messages": [{"role": "user", "content": "conversation s"}]}
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and "[DONE]" in r.text
        home = fleet.streamed[-1]
        fleet.failing[home] = "500"
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and "[DONE]" in r.text and '"error"' not in r.text
        assert r.headers["x-spillover-route"] == "local"
        assert fleet.streamed[-1] != home and fleet.hosted == []
        attempts = (await client.get("/status")).json()["recent"][0]["attempts"]
        assert attempts == [f"small@{home}:8102", f"small@{fleet.streamed[-1]}:8102"]


async def test_every_replica_failing_spills_hosted_after_bounded_sibling_retries() -> None:
    # attempts_per_target (2 by default) bounds the attempts on one deployment.
    fleet = FlakyFleet(answer=list(THREE), failing=dict.fromkeys(THREE, "500"))
    async with flaky_router(fleet) as client:
        chat = {"model": "small", "messages": [{"role": "user", "content": "conversation a"}]}
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "hosted"
        assert r.headers["x-spillover-reason"] == "local-error"
        assert fleet.hosted == ["/v1/chat/completions"]
        attempts = (await client.get("/status")).json()["recent"][0]["attempts"]
        assert len(attempts) == 3 and attempts[2] == "mistral:mistral-small-latest"
        assert attempts[0] != attempts[1]
        assert all(a.startswith("small@10.0.0.") for a in attempts[:2])
    # A larger bound tries every replica, each once, before the spill.
    fleet = FlakyFleet(answer=list(THREE), failing=dict.fromkeys(THREE, "reset"))
    async with flaky_router(fleet, "attempts_per_target: 5") as client:
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and r.headers["x-spillover-route"] == "hosted"
        attempts = (await client.get("/status")).json()["recent"][0]["attempts"]
        assert sorted(attempts[:-1]) == [f"small@{a}:8102" for a in THREE]
        assert attempts[-1] == "mistral:mistral-small-latest" and len(fleet.hosted) == 1
    # With one replica there is no sibling: the spill is at once, as before.
    fleet = FlakyFleet(answer=["10.0.0.1"], failing={"10.0.0.1": "500"})
    async with flaky_router(fleet, "attempts_per_target: 5") as client:
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.headers["x-spillover-route"] == "hosted"
        attempts = (await client.get("/status")).json()["recent"][0]["attempts"]
        assert attempts == ["small@10.0.0.1:8102", "mistral:mistral-small-latest"]


async def test_a_sibling_retry_skips_open_and_saturated_replicas() -> None:
    fleet = FlakyFleet(answer=list(THREE))
    async with flaky_router(fleet, "breaker_failures: 1, breaker_cooldown_s: 60") as client:
        chat = {"model": "small", "messages": [{"role": "user", "content": "conversation o"}]}
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        home = fleet.served[-1][0]
        sibling = (await client.post("/v1/route/explain", json=chat)).json()["plan"][
            "replicas"]["small"]["failover"][0][:-5]
        # The sibling next in the conversation's order fails too, which opens its breaker
        # (one failure opens one here): the retry after the home replica skips it.
        fleet.failing[sibling] = "500"
        other = next(a for a in THREE if a not in (home, sibling))
        for i in range(1000):  # a conversation homed on the sibling opens its breaker
            probe = {"model": "small",
                     "messages": [{"role": "user", "content": f"conversation q{i}"}]}
            plan = (await client.post("/v1/route/explain", json=probe)).json()["plan"]
            if plan["replicas"]["small"]["replica"] == f"{sibling}:8102":
                break
        assert (await client.post("/v1/chat/completions", json=probe)).status_code == 200
        assert (await client.get("/status")).json()["breakers"][f"small@{sibling}:8102"][
            "state"] == "open"
        fleet.failing[home] = "500"
        choice = (await client.post("/v1/route/explain", json=chat)).json()["plan"][
            "replicas"]["small"]
        assert choice["replica"] == f"{home}:8102"
        assert choice["failover"] == [f"{other}:8102"]
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.headers["x-spillover-route"] == "local" and fleet.served[-1][0] == other
        assert (await client.get("/status")).json()["recent"][0]["attempts"] == [
            f"small@{home}:8102", f"small@{other}:8102"]
        # The only closed replica failing too: no sibling left to try, hosted.
        fleet.failing[other] = "500"
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.headers["x-spillover-route"] == "hosted"


async def test_a_stream_broken_after_its_first_byte_is_not_retried_and_counts() -> None:
    fleet = FlakyFleet(answer=list(THREE))
    async with flaky_router(fleet) as client:
        chat = {"model": "small", "stream": True,
                "messages": [{"role": "user", "content": "conversation t"}]}
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and "[DONE]" in r.text
        home = fleet.streamed[-1]
        name = f"small@{home}:8102"
        fleet.breaking.add(home)
        fleet.streamed.clear()
        r = await client.post("/v1/chat/completions", json=chat)
        # The caller had its first bytes: the stream ends with an error event, from the
        # same replica, and nothing else is asked.
        assert r.status_code == 200
        assert '"first"' in r.text and '"error"' in r.text and "[DONE]" not in r.text
        assert fleet.streamed == [home] and fleet.hosted == []
        status = (await client.get("/status")).json()
        assert status["recent"][0]["attempts"] == [name]
        assert status["recent"][0]["status"] == 502
        # ...and it counts against that replica's breaker like a failure before the byte.
        assert status["breakers"][name]["consecutive_failures"] == 1
        assert all(b["consecutive_failures"] == 0
                   for n, b in status["breakers"].items() if n != name)


def test_equally_loaded_replicas_share_requests_without_a_key() -> None:
    idle = [(n, load()) for n in ("a:1", "b:1", "c:1")]
    got = [choose(idle, None, turn=t).replica for t in range(100)]  # type: ignore[union-attr]
    assert {n: got.count(n) for n in ("a:1", "b:1", "c:1")} == {
        "a:1": 34, "b:1": 33, "c:1": 33}
    # Only the least loaded share: a busier one gets none.
    busy = [("a:1", load(1)), ("b:1", load()), ("c:1", load())]
    got = [choose(busy, None, turn=t).replica for t in range(10)]  # type: ignore[union-attr]
    assert sorted(set(got)) == ["b:1", "c:1"] and got.count("b:1") == 5


async def test_the_router_spreads_requests_without_a_key_over_idle_replicas() -> None:
    fleet = FlakyFleet(answer=list(THREE))
    embeds = YAML.replace(f"port: {PORT}\n", f"port: {PORT}\n        endpoints: [embeddings]\n")
    async with flaky_router(fleet, yaml=embeds) as client:
        for _ in range(100):
            r = await client.post("/v1/embeddings", json={"model": "small", "input": "x"})
            assert r.status_code == 200, r.text
            assert r.headers["x-spillover-route"] == "local"
    counts = sorted(fleet.embedded.count(a) for a in THREE)
    assert counts == [33, 33, 34]  # each a fair share; before, the first by name took all


def test_a_retry_goes_only_to_a_usable_sibling_never_twice() -> None:
    names = ["a:1", "b:1", "c:1"]
    ranked = []
    tried: list[str] = []
    while (c := choose([(n, load()) for n in names], "k", tried=tried)) is not None:
        ranked.append(c.replica)
        tried.append(c.replica)
    assert sorted(ranked) == names  # each once, in the conversation's order, then none
    assert ranked[0] == choose([(n, load()) for n in names], "k").replica  # type: ignore[union-attr]
    home, nxt, last = ranked
    for state in ({"healthy": False}, {"saturated": True}):
        sick = [(n, load(**state) if n == nxt else load()) for n in names]
        assert choose(sick, "k", tried=[home]).replica == last  # type: ignore[union-attr]
        assert choose(sick, "k", tried=[home, last]) is None
        assert choose(sick, None, tried=[home]).replica == last  # type: ignore[union-attr]
    open_ = choose([(n, load()) for n in names], "k", blocked={nxt: "circuit open"},
                   tried=[home])
    assert open_ is not None and open_.replica == last
