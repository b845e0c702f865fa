"""Building configs, a mock upstream world and the router app on it for unit tests (no
network, no socket): the fixtures and checks that many test files share."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import yaml

from router.app import Settings, create_app
from router.config import Config, parse_config
from router.routing.auth import key_digest
from router.runtime import Runtime

LOCAL = "http://127.0.0.1:8101"
HOSTED = "https://api.mistral.test/v1"
HOSTED_KEY = "sk-test-secret"  # the only key the World's hosted side accepts
ENV = {"MISTRAL_API_KEY": HOSTED_KEY}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}

BASE_YAML = f"""
server: {{request_timeout_s: 5, metrics_interval_s: 60, ledger_path: ":memory:"}}
providers:
  mistral: {{kind: mistral, base_url: "{HOSTED}", api_key_env: MISTRAL_API_KEY,
            timeouts: {{connect: 1, read: 2, write: 1, pool: 1}}}}
aliases:
  demo:
    local:
      - name: demo-local
        model: /models/demo
        license: apache-2.0
        served_model_name: demo
        port: 8101
        max_model_len: 2048
        saturation: {{max_waiting: 0, max_inflight: 4, resume_below: 0.5}}
    hosted:
      - provider: mistral
        model: mistral-small-latest
        price: {{input_per_mtok: 0.1, output_per_mtok: 0.3}}
"""


def config(yaml_text: str = BASE_YAML, **overrides: Any) -> Config:
    data = yaml.safe_load(yaml_text)
    data.update(overrides)
    return parse_config(yaml.safe_dump(data))


METRICS_IDLE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="demo"} %(waiting)s
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="demo"} %(kv)s
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="demo"} 1234.0
"""


def completion(model: str, content: str = "hi", tool_calls: list[Any] | None = None,
               usage: tuple[int, int] = (10, 5)) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {
        "id": "cmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                  "total_tokens": sum(usage)},
    }


def sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + \
        b"data: [DONE]\n\n"


def chunk(model: str, content: str | None = None, usage: tuple[int, int] | None = None,
          finish: str | None = None) -> dict[str, Any]:
    choices = [] if usage and content is None and finish is None else [
        {"index": 0, "delta": {"content": content} if content is not None else {},
         "finish_reason": finish}]
    out: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                           "model": model, "choices": choices}
    if usage:
        out["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                        "total_tokens": sum(usage)}
    return out


Handler = Callable[[httpx.Request], httpx.Response]


def tool_calling_hosted(answered: list[str]) -> Handler:
    """A La Plateforme that asks for get_weather: it answers the tool call it was sent back
    (or a new one), and records the tool-call ids of the results it received, which must be
    its own 9-character ids, whatever the caller used."""
    def hosted(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        ids = [m.get("tool_call_id") for m in body["messages"] if m.get("role") == "tool"]
        answered.extend(i for i in ids if i)
        call = [{"id": ids[0] if ids else "Abc123XyZ", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
        out = completion(body["model"], "", tool_calls=call, usage=(100, 20))
        out["choices"][0]["finish_reason"] = "tool_calls"
        return httpx.Response(200, json=out)

    return hosted


@dataclass
class World:
    """Local engine + La Plateforme as one MockTransport; tests flip their behaviour."""

    local_up: bool = True
    waiting: float = 0
    kv: float = 0.1
    local: Handler | None = None
    hosted: Handler | None = None
    seen: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    def bodies(self, where: str) -> list[dict[str, Any]]:
        return [b for w, _, b in self.seen if w == where]

    def _handle(self, req: httpx.Request) -> httpx.Response:
        url = str(req.url)
        if url.startswith(LOCAL):
            if not self.local_up:
                raise httpx.ConnectError("connection refused", request=req)
            path = req.url.path
            if path == "/health":
                return httpx.Response(200)
            if path == "/metrics":
                return httpx.Response(200, text=METRICS_IDLE % {"waiting": self.waiting,
                                                                "kv": self.kv})
            self.seen.append(("local", path, json.loads(req.content)))
            if self.local is not None:
                return self.local(req)
            return httpx.Response(200, json=completion("demo", "local answer"))
        if url.startswith(HOSTED):
            body = json.loads(req.content)
            self.seen.append(("hosted", req.url.path, body))
            if req.headers.get("authorization") != f"Bearer {HOSTED_KEY}":
                return httpx.Response(401, json={"message": "Unauthorized"})
            if self.hosted is not None:
                return self.hosted(req)
            return httpx.Response(200, json=completion(body["model"], "hosted answer",
                                                       usage=(1000, 2000)))
        return httpx.Response(404)


def gateway_app(world: World | None = None, cfg: Config | None = None,
                env: Mapping[str, str] = ENV, **settings: Any) -> Any:
    """The router app with its upstreams on `world`'s MockTransport (a fresh World and the
    BASE_YAML config unless given)."""
    return create_app(Settings(env=dict(env), **settings),
                      config=cfg if cfg is not None else config(),
                      transport=(world if world is not None else World()).transport())


@asynccontextmanager
async def lifespan_client(app: Any, **transport: Any) -> AsyncIterator[httpx.AsyncClient]:
    """`app` with its lifespan running, and a client that calls it in-process."""
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, **transport),
            base_url="http://router") as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, object]:
    """`resp` has `status` and OpenAI's error shape, with a message and no traceback."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in resp.text
    return err


class Clock:
    """A clock for code that takes `clock: Callable[[], float]`: it moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


# -- callers with keys, an admin and a second hosted provider (backup) -------------------

BACKUP = "https://backup.test/v1"
BRAIN_ENV = {**ENV, "BACKUP_KEY": "sk-backup-secret"}
KEYS = {"alice": "sk-alice-1", "bob": "sk-bob-2", "lab": "sk-lab-3", "vault": "sk-vault-4",
        "admin": "sk-admin-5"}


def brain_config(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(BASE_YAML)
    data["providers"]["backup"] = {"base_url": BACKUP, "api_key_env": "BACKUP_KEY",
                                   "timeouts": {"connect": 1, "read": 2, "write": 1, "pool": 1}}
    data["aliases"]["demo"]["hosted"].append(
        {"provider": "backup", "model": "backup-small",
         "price": {"input_per_mtok": 0.2, "output_per_mtok": 0.6}})
    data["aliases"]["research"] = {"local": [{
        "name": "large-local", "model": "/models/large", "license": "mrl", "port": 8102,
        "base_url": "http://127.0.0.1:8101/v1"}]}
    data["routing"] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02,
                       "cost_first_max_wait_s": 0.3, "residency_max_wait_s": 0.3,
                       "breaker_failures": 2, "breaker_cooldown_s": 30}
    data["callers"] = {
        "alice": {"key_sha256": [key_digest(KEYS["alice"])]},
        "bob": {"key_sha256": [key_digest(KEYS["bob"])], "aliases": ["demo"],
                "may_force_route": False},
        "lab": {"key_sha256": [key_digest(KEYS["lab"])], "use": "research"},
        "vault": {"key_sha256": [key_digest(KEYS["vault"])], "residency": "onprem"},
    }
    data["admin_key_sha256"] = [key_digest(KEYS["admin"])]
    data.update(changes)
    return data


def auth(who: str) -> dict[str, str]:
    return bearer(KEYS[who])


@asynccontextmanager
async def router_app(world: World,
                     data: dict[str, Any]) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    app = gateway_app(world, config(yaml.safe_dump(data)), BRAIN_ENV)
    async with lifespan_client(app) as c:
        yield c, app.state.runtime


@asynccontextmanager
async def router(world: World, data: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with router_app(world, data) as (c, _):
        yield c


async def call_then_leave(app: Any, path: str, body: bytes, *, after: int,
                          headers: tuple[tuple[bytes, bytes], ...] = (),
                          app_may_raise: bool = True) -> list[Any]:
    """POST body to path straight through the ASGI app, as a caller that goes away (its
    next send raises, as a closed socket does) once `after` messages went out; what was
    sent. Run inside the app's lifespan. `app_may_raise` False: the app must absorb the
    gone caller itself (an OSError out of it fails the test)."""
    sent: list[Any] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        sent.append(message)
        if len(sent) >= after:  # the start and a few events went out; then the caller is gone
            raise OSError("the caller closed the connection")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    # What the server sees of a gone caller; the app may let it through.
    with contextlib.suppress(OSError) if app_may_raise else contextlib.nullcontext():
        await asyncio.wait_for(app(scope, receive, send), 5)
    return sent
