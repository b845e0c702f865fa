"""Faults, end to end: the engine killed under load, hosted rate-limit and 5xx storms, the
router itself killed under load. Each bounded in time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml

from router.accounting.ledger import Ledger
from tests.e2e.conftest import DEMO_TOOL_ARGS, ROOT, Hosted, Router
from tests.fakes import free_port

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Say hello"}]
PRICE = {"input_per_mtok": 0.1, "output_per_mtok": 0.3}


class Served:
    """`spillover serve` in a subprocess, as an operator runs it."""

    def __init__(self, tmp: Path, data: dict[str, Any], env: dict[str, str],
                 no_engines: bool = False) -> None:
        self.port = free_port()
        data["server"] = {**data.get("server", {}), "port": self.port,
                          "ledger_path": str(tmp / "ledger.db"), "log_dir": str(tmp / "logs")}
        self.ledger_path = tmp / "ledger.db"
        self.config = tmp / "models.yaml"
        self.config.write_text(yaml.safe_dump(data))
        cmd = [sys.executable, "-m", "router.cli", "serve", "--config", str(self.config)]
        if no_engines:
            cmd.append("--no-engines")
        # A file, not a pipe: the access log would fill a pipe and block the router.
        self.log = tmp / "router.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="open",
                                    max_retries=0, timeout=60)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/status", timeout=10).json()
        return data

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"router exited: {self.stderr()}"
            try:
                if predicate(self.status()):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        s.stop()


def test_engine_killed_under_load(served: list[Served], tmp_path: Path,
                                  plateforme: Hosted) -> None:
    """kill -9 of the engine: non-streamed requests fail over, open streams end with an
    error event, the supervisor restarts the engine and traffic comes back to local."""
    s = Served(tmp_path, {
        "providers": {"mistral": {"kind": "mistral", "base_url": plateforme.url + "/v1",
                                  "api_key_env": "MISTRAL_API_KEY"}},
        "aliases": {"demo": {
            "local": [{"name": "demo-local", "model": str(ROOT / ".spillover" / "demo-model"),
                       "license": "apache-2.0", "served_model_name": "demo",
                       "port": free_port(), "max_model_len": 2048,
                       "extra_args": list(DEMO_TOOL_ARGS),
                       "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}],
            "hosted": [{"provider": "mistral", "model": "mistral-small-latest",
                        "price": PRICE}]}},
    }, {"MISTRAL_API_KEY": plateforme.fake.api_key})
    served.append(s)
    s.wait(lambda st: st["engines"]["demo-local"]["healthy"], 600, "the managed engine")
    [engine] = s.status()["managed_engines"]
    assert engine["running"] and engine["restarts"] == 0

    stream_errors: list[str] = []
    streams_open = threading.Semaphore(0)

    def stream() -> None:
        out = s.client.chat.completions.create(
            model="demo", messages=HELLO, max_tokens=1800, n=4, stream=True,
            extra_body={"ignore_eos": True})
        try:
            for i, _ in enumerate(out):
                if i == 2:
                    streams_open.release()
        except openai.APIError as exc:
            stream_errors.append(str(exc))
        else:
            stream_errors.append("ended without an error")

    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def unary() -> None:
        while not stop.is_set():
            try:
                raw = s.client.chat.completions.with_raw_response.create(
                    model="demo", messages=HELLO, max_tokens=8)
                results.append((raw.status_code, raw.headers["x-spillover-route"]))
            except openai.APIError as exc:
                results.append((getattr(exc, "status_code", 0) or 0, str(exc)))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    threads += [threading.Thread(target=unary) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(2):
        assert streams_open.acquire(timeout=60)
    time.sleep(0.5)
    os.kill(engine["pid"], signal.SIGKILL)
    s.wait(lambda st: not st["engines"]["demo-local"]["healthy"], 30, "the engine down")
    time.sleep(2)  # load keeps coming while the engine is gone
    stop.set()
    for t in threads:
        t.join(120)

    assert len(stream_errors) == 2
    assert all("ended without" not in e for e in stream_errors), stream_errors
    assert results and all(code == 200 for code, _ in results), results
    assert any(route == "hosted" for _, route in results)  # they failed over
    # The supervisor brings the engine back and traffic returns to local.
    s.wait(lambda st: st["managed_engines"][0]["restarts"] == 1
           and st["engines"]["demo-local"]["healthy"], 600, "the engine restarted")
    raw = s.client.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8)
    assert raw.headers["x-spillover-route"] == "local"
    restarted = s.status()["managed_engines"][0]["pid"]
    assert restarted != engine["pid"]
    # Ctrl-C stops the router and the restarted engine with it: no orphan.
    s.stop()
    assert s.proc.returncode is not None
    assert not _alive(restarted), "the restarted engine outlived the router"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_hosted_storms_stay_bounded(make_router: Any, plateforme: Hosted,
                                    backup: Hosted) -> None:
    """429 and 5xx storms: retries bounded, breakers open, no request outlives its
    deadline."""
    router: Router = make_router(request_timeout_s=5, extra={"routing": {
        "attempts_per_target": 2, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
        "breaker_failures": 3, "breaker_cooldown_s": 30}})
    plateforme.fake.mode = "429"
    backup.fake.mode = "503"
    hosted = {"x-spillover-route": "hosted"}

    def one(_: int) -> tuple[int, float, str]:
        t0 = time.monotonic()
        try:
            router.client.chat.completions.create(model="demo", messages=HELLO, max_tokens=8,
                                                  extra_headers=hosted)
            return 200, time.monotonic() - t0, ""
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            return exc.status_code, time.monotonic() - t0, str(body.get("code"))

    n = 20
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(n)))
    assert all(status in (429, 502, 503) for status, _, _ in results), results
    assert max(elapsed for _, elapsed, _ in results) < 5 + 3  # the deadline, plus slack
    # Without breakers every request would try each provider twice: 2 x 2 x 20 = 80. With
    # them, at most the attempts started before each breaker opened (4 callers at once).
    upstream = len(plateforme.fake.requests) + len(backup.fake.requests)
    assert upstream <= 16, upstream
    breakers = httpx.get(router.url + "/status", timeout=10).json()["breakers"]
    assert {b["state"] for b in breakers.values()} == {"open"}
    # Once open, requests are answered at once with a clear code, not retried.
    status, elapsed, code = one(0)
    assert status == 503 and code == "circuit_open" and elapsed < 2


def test_router_killed_under_load_loses_no_finished_call(served: list[Served], tmp_path: Path,
                                                         plateforme: Hosted) -> None:
    """kill -9 of the router: every call whose response completed is in the ledger."""
    s = Served(tmp_path, {
        "providers": {"mistral": {"kind": "mistral", "base_url": plateforme.url + "/v1",
                                  "api_key_env": "MISTRAL_API_KEY"}},
        "aliases": {"demo": {"hosted": [{"provider": "mistral",
                                         "model": "mistral-small-latest", "price": PRICE}]}},
    }, {"MISTRAL_API_KEY": plateforme.fake.api_key}, no_engines=True)
    served.append(s)
    s.wait(lambda st: st["ready"], 60, "the router")
    done: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(k: int) -> None:
        i = 0
        while not stop.is_set():
            rid = f"kill-{k}-{i}"
            i += 1
            try:
                s.client.chat.completions.create(
                    model="demo", messages=HELLO, max_tokens=8,
                    extra_headers={"x-request-id": rid})
            except openai.APIError:
                return  # the router is gone
            with lock:
                done.append(rid)
            try:
                chunks = list(s.client.chat.completions.create(
                    model="demo", messages=HELLO, max_tokens=8, stream=True,
                    extra_headers={"x-request-id": rid + "s"}))
            except (openai.APIError, httpx.HTTPError):
                return
            if chunks:
                with lock:
                    done.append(rid + "s")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    os.killpg(s.proc.pid, signal.SIGKILL)
    s.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(done) > 20
    ledger = Ledger(s.ledger_path)
    try:
        booked = {r.request_id for r in ledger.rows(since=0, until=time.time() + 60,
                                                    limit=1_000_000)}
    finally:
        ledger.close()
    missing = set(done) - booked
    assert not missing, f"{len(missing)} finished calls not in the ledger: {sorted(missing)[:5]}"


def _group(pgid: int) -> list[int]:
    """The live (non-zombie) processes of process group pgid."""
    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return out


def _listeners(port: int) -> set[int]:
    return {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


@pytest.mark.timeout(1500)
def test_router_killed_takes_its_engine_along(served: list[Served], tmp_path: Path,
                                              plateforme: Hosted) -> None:
    """kill -9 of `spillover serve` with its real engine under load: no engine process
    (API server, EngineCore, the guard) outlives the router by more than a few seconds;
    a router restarted at once, as a service manager would, runs exactly one engine on the
    port, with no restart loop, and serves locally again."""
    engine_port = free_port()
    data = {
        "providers": {"mistral": {"kind": "mistral", "base_url": plateforme.url + "/v1",
                                  "api_key_env": "MISTRAL_API_KEY"}},
        "aliases": {"demo": {
            "local": [{"name": "demo-local", "model": str(ROOT / ".spillover" / "demo-model"),
                       "license": "apache-2.0", "served_model_name": "demo",
                       "port": engine_port, "max_model_len": 2048,
                       "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}],
            "hosted": [{"provider": "mistral", "model": "mistral-small-latest",
                        "price": PRICE}]}},
    }
    env = {"MISTRAL_API_KEY": plateforme.fake.api_key}
    first = Served(tmp_path, json.loads(json.dumps(data)), env)
    served.append(first)
    first.wait(lambda st: st["engines"]["demo-local"]["healthy"], 600, "the managed engine")
    [engine] = first.status()["managed_engines"]
    pgid = os.getpgid(engine["pid"])
    members = _group(pgid)
    # The guard, vLLM's API server and its EngineCore at least, all in the engine's group.
    assert len(members) >= 3 and engine["pid"] in members, members
    assert (tmp_path / "logs" / "demo-local.pid").exists()

    stop = threading.Event()
    streaming = threading.Semaphore(0)

    def load(stream: bool) -> None:
        while not stop.is_set():
            try:
                if stream:
                    out = first.client.chat.completions.create(
                        model="demo", messages=HELLO, max_tokens=1000, stream=True,
                        extra_body={"ignore_eos": True})
                    for i, _ in enumerate(out):
                        if i == 2:
                            streaming.release()
                else:
                    first.client.chat.completions.create(model="demo", messages=HELLO,
                                                         max_tokens=8)
            except Exception:  # the router is gone: every kind of failure is expected
                time.sleep(0.1)

    threads = [threading.Thread(target=load, args=(k < 2,)) for k in range(4)]
    for t in threads:
        t.start()
    assert streaming.acquire(timeout=120) and streaming.acquire(timeout=120)

    os.kill(first.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    first.proc.wait(10)
    # Restarted at once: the old engine may still be shutting down on the port.
    second = Served(tmp_path, json.loads(json.dumps(data)), env)
    served.append(second)
    while _group(pgid):
        assert time.monotonic() - killed < 10, f"engine processes outlived the router: " \
                                               f"{_group(pgid)}"
        time.sleep(0.1)
    print(f"engine group gone {time.monotonic() - killed:.1f} s after the router's kill -9")
    stop.set()
    for t in threads:
        t.join(30)

    second.wait(lambda st: st["engines"]["demo-local"]["healthy"], 600, "the new engine")
    [fresh] = second.status()["managed_engines"]
    assert fresh["restarts"] == 0 and not fresh["adopted"] and fresh["pid"] not in members
    assert _listeners(engine_port) == {fresh["pid"]}
    raw = second.client.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8)
    assert raw.headers["x-spillover-route"] == "local"
    time.sleep(10)  # a restart loop would show within this
    [later] = second.status()["managed_engines"]
    assert later["restarts"] == 0 and later["pid"] == fresh["pid"] and later["running"]
    assert not later["crash_looping"]
    assert _listeners(engine_port) == {fresh["pid"]}
    # Ctrl-C of the new router: its engine goes with it too.
    fresh_group = os.getpgid(fresh["pid"])
    second.stop()
    assert second.proc.returncode is not None
    assert not _group(fresh_group), "the engine outlived its router's Ctrl-C"
