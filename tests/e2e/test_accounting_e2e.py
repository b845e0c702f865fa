"""Callers, the ledger, usage, budgets across restarts, /metrics and config reload, end to
end with the real engine, the fake La Plateformes and the openai client."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.accounting.ledger import Ledger, LedgerRow
from router.routing.auth import key_digest
from tests.e2e.conftest import Engine, Hosted, Router
from tests.fakes import free_port

pytestmark = pytest.mark.e2e

KEYS = {"alpha": "sk-acct-alpha", "beta": "sk-acct-beta", "admin": "sk-acct-admin"}
HELLO = [{"role": "user", "content": "Say hello"}]


def accounts(**alpha: Any) -> dict[str, Any]:
    return {
        "callers": {
            "alpha": {"key_sha256": [key_digest(KEYS["alpha"])], **alpha},
            "beta": {"key_sha256": [key_digest(KEYS["beta"])]},
        },
        "admin_key_sha256": [key_digest(KEYS["admin"])],
    }


def client(router: Router, who: str) -> openai.OpenAI:
    return router.client.with_options(api_key=KEYS[who])


def get(router: Router, path: str, who: str = "admin", **params: Any) -> httpx.Response:
    return httpx.get(router.url + path, params=params, timeout=10,
                     headers={"authorization": f"Bearer {KEYS[who]}"})


def ledger_rows(router: Router) -> dict[str, LedgerRow]:
    assert router.config is not None
    ledger = Ledger(router.config["server"]["ledger_path"])
    try:
        rows = ledger.rows(since=0, until=time.time() + 60)
    finally:
        ledger.close()
    return {r.request_id: r for r in rows}


def wait_for_row(router: Router, rid: str, timeout: float = 10) -> LedgerRow:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = ledger_rows(router).get(rid)
        if row is not None:
            return row
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {rid}")


def test_keys_missing_wrong_and_right(make_router: Any) -> None:
    router: Router = make_router(extra=accounts())
    with pytest.raises(openai.AuthenticationError) as info:
        router.client.with_options(api_key="sk-not-a-key").chat.completions.create(
            model="demo", messages=HELLO, max_tokens=4)
    assert info.value.status_code == 401 and "sk-not-a-key" not in str(info.value.body)
    r = httpx.post(router.url + "/v1/chat/completions", timeout=10,
                   json={"model": "demo", "messages": HELLO})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    out = client(router, "alpha").chat.completions.create(model="demo", messages=HELLO,
                                                          max_tokens=4)
    assert out.choices[0].message.content is not None


def test_ledger_rows_equal_what_clients_received(make_router: Any, engine: Engine) -> None:
    router: Router = make_router(extra=accounts())
    alpha = client(router, "alpha")
    # Non-streamed, local.
    raw = alpha.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8, extra_headers={"x-request-id": "acct-1"})
    usage = raw.parse().usage
    assert usage is not None
    # Streamed with include_usage: the client's usage chunk is what the ledger holds.
    chunks = list(alpha.chat.completions.create(
        model="demo", messages=HELLO, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-request-id": "acct-2"}))
    streamed_usage = chunks[-1].usage
    assert streamed_usage is not None
    # Streamed without include_usage: no usage reaches the client, the ledger still has it.
    chunks_plain = list(alpha.chat.completions.create(
        model="demo", messages=HELLO, max_tokens=8, stream=True,
        extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "acct-3"}))
    assert all(c.usage is None for c in chunks_plain)
    # Hosted, non-streamed.
    raw_h = alpha.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=8,
        extra_headers={"x-request-id": "acct-4", "x-spillover-route": "hosted"})
    usage_h = raw_h.parse().usage
    assert usage_h is not None
    rows = ledger_rows(router)
    r1, r2, r3, r4 = (rows[f"acct-{i}"] for i in range(1, 5))
    assert (r1.prompt_tokens, r1.completion_tokens) == (usage.prompt_tokens,
                                                        usage.completion_tokens)
    assert (r2.prompt_tokens, r2.completion_tokens) == (streamed_usage.prompt_tokens,
                                                        streamed_usage.completion_tokens)
    assert r3.completion_tokens == 8  # ignore_eos: exactly max_tokens
    assert (r4.prompt_tokens, r4.completion_tokens) == (usage_h.prompt_tokens,
                                                        usage_h.completion_tokens)
    assert r4.cost_usd == pytest.approx(float(raw_h.headers["x-spillover-cost-usd"]))
    assert r4.cost_usd == pytest.approx(
        (usage_h.prompt_tokens * 0.1 + usage_h.completion_tokens * 0.3) / 1e6)
    for row, route in ((r1, "local"), (r2, "local"), (r3, "local"), (r4, "hosted")):
        assert row.caller == "alpha" and row.route == route and row.status == 200
        assert row.alias == "demo" and row.latency_s > 0
    # Local calls know what they would have cost hosted: the saving.
    assert r1.hosted_equiv_usd == pytest.approx(
        (r1.prompt_tokens * 0.1 + r1.completion_tokens * 0.3) / 1e6)


def _engine_metric(engine: Engine, name: str) -> float:
    text = httpx.get(engine.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.name == name)


def test_client_disconnect_cancels_upstream_and_is_accounted(make_router: Any,
                                                            engine: Engine) -> None:
    router: Router = make_router(extra=accounts())
    before = _engine_metric(engine, "vllm:generation_tokens_total")
    # A slow reader with small buffers: the generation cannot finish before we leave.
    http = httpx.Client(timeout=60, transport=httpx.HTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]))
    with client(router, "alpha").with_options(http_client=http) \
            .chat.completions.with_streaming_response.create(
                model="demo", messages=HELLO, max_tokens=1800, n=4, stream=True,
                extra_body={"ignore_eos": True},
                extra_headers={"x-request-id": "acct-cut"}) as s:
        tokens = 0  # chunks that carried text, one token each from vLLM
        for line in s.iter_lines():
            if line.startswith("data:"):
                choices = json.loads(line[5:])["choices"]
                tokens += sum(bool(c["delta"].get("content")) for c in choices)
            if tokens >= 5:
                break
    http.close()
    row = wait_for_row(router, "acct-cut")
    assert row.status == 499 and row.route == "local"
    assert row.completion_tokens >= tokens  # what the upstream generated, not nothing
    # Cancelled upstream: the engine stops long before its 4 x 1,800 tokens (a warm
    # engine needs several seconds for them, even on a busy machine).
    deadline = time.monotonic() + 30
    while _engine_metric(engine, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the engine kept generating"
        time.sleep(0.2)
    generated = _engine_metric(engine, "vllm:generation_tokens_total") - before
    assert row.completion_tokens <= generated < 4 * 1800


def test_each_caller_sees_only_its_own_usage(make_router: Any) -> None:
    router: Router = make_router(extra=accounts())
    for who, n in (("alpha", 2), ("beta", 1)):
        for _ in range(n):
            client(router, who).chat.completions.create(model="demo", messages=HELLO,
                                                        max_tokens=4)
    mine = get(router, "/v1/usage", "alpha", group_by="caller,route").json()
    assert [(d["caller"], d["requests"]) for d in mine["data"]] == [("alpha", 2)]
    r = get(router, "/v1/usage", "alpha", caller="beta")
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
    everyone = get(router, "/v1/usage", group_by="caller").json()
    assert {d["caller"]: d["requests"] for d in everyone["data"]} == {"alpha": 2, "beta": 1}
    assert everyone["total"]["requests"] == 3
    text = get(router, "/v1/usage", group_by="caller,route", format="csv").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {(r["caller"], r["route"], r["requests"]) for r in rows} == {
        ("alpha", "local", "2"), ("beta", "local", "1")}
    # The CLI reads the same ledger.
    assert router.config_path is not None
    out = subprocess.run(
        [sys.executable, "-m", "router.cli", "usage", "--config", str(router.config_path),
         "--group-by", "caller"], capture_output=True, text=True, timeout=60, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].split()[:2] == ["caller", "requests"]
    assert any(ln.split()[:2] == ["alpha", "2"] for ln in lines)
    assert any(ln.split()[:2] == ["TOTAL", "3"] for ln in lines)


def test_budget_survives_a_restart(make_router: Any, plateforme: Hosted) -> None:
    extra = accounts(budget={"daily_usd": 1.0})
    first: Router = make_router(extra=extra)
    alpha = client(first, "alpha")
    costs = []
    for _ in range(3):
        raw = alpha.chat.completions.with_raw_response.create(
            model="demo", messages=HELLO, max_tokens=8,
            extra_headers={"x-spillover-route": "hosted"})
        costs.append(float(raw.headers["x-spillover-cost-usd"]))
    spent = get(first, "/status").json()["budgets"]["callers"]["alpha"]["daily"]["spent"]
    assert spent == pytest.approx(sum(costs)) and spent > 0
    first.stop()
    assert first.config is not None
    second: Router = make_router(
        extra=extra, ledger_path=first.config["server"]["ledger_path"])
    again = get(second, "/status").json()["budgets"]["callers"]["alpha"]["daily"]
    assert again["spent"] == pytest.approx(sum(costs))
    assert again["left"] == pytest.approx(1.0 - sum(costs))


def test_metrics_parse_back(make_router: Any) -> None:
    router: Router = make_router(extra=accounts())
    alpha = client(router, "alpha")
    for _ in range(3):
        alpha.chat.completions.create(model="demo", messages=HELLO, max_tokens=4)
    alpha.chat.completions.create(model="demo", messages=HELLO, max_tokens=4,
                                  extra_headers={"x-spillover-route": "hosted"})
    with pytest.raises(openai.NotFoundError):
        alpha.chat.completions.create(model="no-such-model", messages=HELLO)
    # /metrics names callers and their spend: only the admin key (or a metrics token).
    assert httpx.get(router.url + "/metrics", timeout=10).status_code == 401
    text = httpx.get(router.url + "/metrics", timeout=10,
                     headers={"authorization": f"Bearer {KEYS['admin']}"}).text
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("spillover_requests_total", route="local", status="200") == 3
    assert value("spillover_requests_total", route="hosted", reason="forced") == 1
    assert value("spillover_requests_total", alias="other", status="404") == 1
    assert value("spillover_request_latency_seconds_count", route="local") == 3
    assert value("spillover_time_to_first_token_seconds_count", route="hosted") == 1
    assert value("spillover_tokens_total", route="local", kind="completion") > 0
    assert value("spillover_cost_usd_total", caller="alpha", route="hosted") > 0
    assert value("spillover_saving_usd_total", caller="alpha", route="local") > 0
    assert value("spillover_engine_healthy", engine="demo-local") == 1
    assert value("spillover_engine_inflight", engine="demo-local") == 0
    assert value("spillover_local_share") == pytest.approx(0.75)
    breakers = {s.labels["upstream"]: s.value for s in samples
                if s.name == "spillover_breaker_state"}
    assert breakers == {"mistral:mistral-small-latest": 0}  # closed


def test_reload_good_and_bad_files(make_router: Any) -> None:
    router: Router = make_router(extra=accounts())
    assert router.config_path is not None and router.config is not None
    admin = {"authorization": f"Bearer {KEYS['admin']}"}
    data = yaml.safe_load(router.config_path.read_text())
    data["aliases"]["demo-too"] = data["aliases"]["demo"] | {
        "local": [{**data["aliases"]["demo"]["local"][0], "name": "demo-too-local"}]}
    router.config_path.write_text(yaml.safe_dump(data))
    # A long stream in flight while the config changes under it.
    stream = client(router, "alpha").chat.completions.create(
        model="demo", messages=HELLO, max_tokens=64, stream=True,
        extra_body={"ignore_eos": True})
    first = next(iter(stream))
    r = httpx.post(router.url + "/admin/reload", headers=admin, timeout=30)
    assert r.status_code == 200 and "demo-too" in r.json()["aliases"]
    rest = list(stream)
    assert first.choices and rest and rest[-1].choices[0].finish_reason == "length"
    out = client(router, "alpha").chat.completions.with_raw_response.create(
        model="demo-too", messages=HELLO, max_tokens=4)
    assert out.headers["x-spillover-backend"] == "demo-too-local"
    # A file that does not validate is refused with its errors; the running config stays.
    router.config_path.write_text(router.config_path.read_text().replace(
        "license: apache-2.0", "license: no-such-licence", 1))
    r = httpx.post(router.url + "/admin/reload", headers=admin, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_config" and "no-such-licence" in err["message"]
    assert "line " in err["message"]
    models = {m.id for m in client(router, "alpha").models.list()}
    assert models == {"demo", "demo-too", "code", "embed"}
    # A file cut off before its callers would open the gateway: refused without allow_open.
    cut = yaml.safe_load(router.config_path.read_text().replace(
        "license: no-such-licence", "license: apache-2.0"))
    del cut["callers"]
    router.config_path.write_text(yaml.safe_dump(cut))
    r = httpx.post(router.url + "/admin/reload", headers=admin, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "reload_opens_gateway"
    r = httpx.post(router.url + "/v1/chat/completions", timeout=10,
                   json={"model": "demo", "messages": HELLO})
    assert r.status_code == 401
    r = httpx.post(router.url + "/admin/reload", timeout=30,
                   headers={"authorization": f"Bearer {KEYS['alpha']}"})
    assert r.status_code == 403


def test_sighup_reloads_a_served_router(tmp_path: Path, plateforme: Hosted) -> None:
    """`spillover serve` as a user runs it: SIGHUP re-reads models.yaml."""
    port = free_port()
    path = tmp_path / "models.yaml"

    def write(aliases: list[str]) -> None:
        path.write_text(yaml.safe_dump({
            "server": {"port": port, "ledger_path": str(tmp_path / "ledger.db")},
            "providers": {"mistral": {"kind": "mistral", "base_url": plateforme.url + "/v1",
                                      "api_key_env": "MISTRAL_API_KEY"}},
            "aliases": {a: {"hosted": [{"provider": "mistral", "model": "mistral-small-latest",
                                        "price": {"input_per_mtok": 0.1,
                                                  "output_per_mtok": 0.3}}]}
                        for a in aliases}}))

    write(["one"])
    env = {**os.environ, "MISTRAL_API_KEY": plateforme.fake.api_key}
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--no-engines",
                             "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(url + "/healthz", timeout=1).status_code == 200)
        assert _models(url) == {"one"}
        write(["one", "two"])
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: _models(url) == {"one", "two"})
        path.write_text("aliases: {broken: {}}\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert _models(url) == {"one", "two"}
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert b"reload refused" in err
    assert b"Traceback" not in err


def _models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]}


def _wait(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("timed out")
