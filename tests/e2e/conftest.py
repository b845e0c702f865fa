"""End-to-end fixtures: one real vLLM CPU engine on the demo model for the whole session,
fake La Plateformes on loopback, and real routers (uvicorn) driven by the openai client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import psutil
import pytest
import yaml

from router.app import Settings, create_app
from router.config import parse_config
from router.routing.auth import key_digest
from serving.demo_model import build_demo_model
from serving.engine import KILLED_EXIT_S, EngineProcess, EngineSpec
from tests.fakes import FakePlateforme, ServerThread, free_port
from tests.fakes import create_app as create_fake_app

E2E_ADMIN_KEY = "sk-e2e-fixture-admin"

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# Tool calls from random weights: the grammar forces the JSON, and without free whitespace
# a named tool_choice ends in a complete call within a few dozen tokens.
DEMO_TOOL_ARGS = ("--enable-auto-tool-choice", "--tool-call-parser", "mistral",
                  "--structured-outputs-config",
                  '{"backend":"xgrammar","disable_any_whitespace":true}')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that stop the shared engine run after every test that needs it.
    items.sort(key=lambda item: item.get_closest_marker("stops_engine") is not None)


class LoopThread:
    """An event loop in a thread, so sync session fixtures can own asyncio processes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@dataclass
class Engine:
    process: EngineProcess
    loop: LoopThread

    @property
    def base_url(self) -> str:
        return self.process.spec.base_url

    def stop(self) -> None:
        group = self.process.pgid
        # stop() waits for killed workers to finish exiting, which a loaded machine is slow at.
        self.loop.run(self.process.stop(grace=10), timeout=10 + KILLED_EXIT_S + 20)
        left = [p.pid for p in psutil.process_iter()
                if group is not None and _in_group(p.pid, group)
                and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"engine processes {left} of group {group} outlived stop()"


def _in_group(pid: int, group: int) -> bool:
    try:
        return os.getpgid(pid) == group
    except OSError:
        return False


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    model_dir = build_demo_model(ROOT / ".spillover" / "demo-model")
    spec = EngineSpec(
        name="demo-local", model=str(model_dir), served_model_name="demo",
        port=free_port(), max_model_len=2048,
        extra_args=DEMO_TOOL_ARGS,
        env=(("VLLM_CPU_KVCACHE_SPACE", "1"),),
    )
    log_dir = tmp_path_factory.mktemp("engine-logs")
    loop = LoopThread()
    proc = EngineProcess(spec, log_dir=log_dir)
    loop.run(proc.start(), timeout=30)
    try:
        loop.run(proc.wait_ready(timeout=900), timeout=910)
    except BaseException:
        loop.run(proc.stop(grace=5), timeout=5 + KILLED_EXIT_S + 20)
        loop.close()
        raise
    eng = Engine(proc, loop)
    yield eng
    eng.stop()
    loop.close()


@dataclass
class Hosted:
    fake: FakePlateforme
    url: str


@pytest.fixture(scope="session")
def _hosted_servers() -> Iterator[tuple[Hosted, Hosted]]:
    mistral, backup = FakePlateforme(), FakePlateforme(api_key="backup-key")
    with ServerThread(create_fake_app(mistral)) as s1, ServerThread(create_fake_app(backup)) as s2:
        yield Hosted(mistral, s1.url), Hosted(backup, s2.url)
        mistral.release()
        backup.release()


@pytest.fixture
def plateforme(_hosted_servers: tuple[Hosted, Hosted]) -> Iterator[Hosted]:
    h = _hosted_servers[0]
    h.fake.reset()
    yield h
    h.fake.release()


@pytest.fixture
def backup(_hosted_servers: tuple[Hosted, Hosted]) -> Iterator[Hosted]:
    h = _hosted_servers[1]
    h.fake.reset()
    yield h
    h.fake.release()


def e2e_config(engine_url: str, mistral_url: str, backup_url: str, max_inflight: int = 16,
               **server: Any) -> dict[str, Any]:
    price = {"input_per_mtok": 0.1, "output_per_mtok": 0.3}
    return {
        # Probes that time out for longer than metrics_stale_s mark an engine down; CI
        # machines are shared and slow at times, so the bound is generous here.
        "server": {"request_timeout_s": 60, "metrics_interval_s": 0.2,
                   "metrics_stale_s": 10, **server},
        "providers": {
            "mistral": {"kind": "mistral", "base_url": mistral_url + "/v1",
                        "api_key_env": "MISTRAL_API_KEY",
                        "timeouts": {"connect": 2, "read": 10, "write": 5, "pool": 5}},
            "backup": {"kind": "mistral", "base_url": backup_url + "/v1",
                       "api_key_env": "BACKUP_API_KEY",
                       "timeouts": {"connect": 2, "read": 10, "write": 5, "pool": 5}},
        },
        "aliases": {
            "demo": {
                "local": [{
                    "name": "demo-local", "model": "demo", "license": "apache-2.0",
                    "served_model_name": "demo", "base_url": engine_url,
                    "max_model_len": 2048,
                    "saturation": {"max_waiting": 0, "max_inflight": max_inflight,
                                   "resume_below": 0.7},
                }],
                "hosted": [
                    {"provider": "mistral", "model": "mistral-small-latest", "price": price},
                    {"provider": "backup", "model": "mistral-small-latest",
                     "price": {"input_per_mtok": 0.2, "output_per_mtok": 0.6}},
                ],
            },
            "code": {
                "local": [{
                    "name": "demo-code", "model": "demo", "license": "apache-2.0",
                    "served_model_name": "demo", "base_url": engine_url,
                    "max_model_len": 2048, "endpoints": ["completions"],
                }],
                "hosted": [{"provider": "mistral", "model": "codestral-latest",
                            "endpoints": ["chat", "fim"],
                            "price": {"input_per_mtok": 0.3, "output_per_mtok": 0.9}}],
            },
            "embed": {
                "hosted": [{"provider": "mistral", "model": "mistral-embed",
                            "endpoints": ["embeddings"],
                            "price": {"input_per_mtok": 0.1, "output_per_mtok": 0}}],
            },
        },
    }


@dataclass
class Router:
    url: str
    client: openai.OpenAI
    server: ServerThread | None = None
    config_path: Path | None = None
    config: dict[str, Any] | None = None
    # Sent on the router's own endpoints (readiness details) when the config has an admin
    # key: without it /readyz answers only whether the router is ready.
    admin_key: str | None = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def get(self, path: str) -> httpx.Response:
        headers = {} if self.admin_key is None else {
            "authorization": f"Bearer {self.admin_key}"}
        return httpx.get(self.url + path, timeout=30, headers=headers)

    def wait_for(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.get("/readyz").json()
            if predicate(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last status: {last}")


@pytest.fixture
def make_router(engine: Engine, plateforme: Hosted, backup: Hosted,
                tmp_path: Path) -> Iterator[Any]:
    servers: list[ServerThread] = []

    def make(engine_url: str | None = None, max_inflight: int = 16,
             extra: dict[str, Any] | None = None, api_key: str = "unused-in-open-mode",
             **server: Any) -> Router:
        server.setdefault("ledger_path", str(tmp_path / f"ledger-{len(servers)}.db"))
        data = e2e_config(engine_url or engine.base_url, plateforme.url, backup.url,
                          max_inflight, **server)
        for key, value in (extra or {}).items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        admin_key = None
        if data.get("admin_key_sha256"):  # one more admin key, the fixture's own
            admin_key = E2E_ADMIN_KEY
            data["admin_key_sha256"] = [*data["admin_key_sha256"], key_digest(admin_key)]
        text = yaml.safe_dump(data)
        cfg = parse_config(text)
        path = tmp_path / f"models-{len(servers)}.yaml"
        path.write_text(text)
        env = {"MISTRAL_API_KEY": plateforme.fake.api_key, "BACKUP_API_KEY": backup.fake.api_key}
        st = ServerThread(create_app(Settings(config_path=str(path), env=env), config=cfg),
                          send_buffer=65536)
        st.start()
        servers.append(st)
        client = openai.OpenAI(base_url=st.url + "/v1", api_key=api_key,
                               max_retries=0, timeout=60)
        r = Router(st.url, client, st, path, data, admin_key)
        if engine_url is None:
            r.wait_for(lambda s: s["engines"]["demo-local"]["healthy"], 10, "engine healthy")
        return r

    yield make
    for st in servers:
        with contextlib.suppress(RuntimeError):
            st.stop()


@pytest.fixture
def router(make_router: Any) -> Router:
    r: Router = make_router()
    return r


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
