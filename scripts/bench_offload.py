#!/usr/bin/env python3
"""Does spilling over keep latency inside the SLO while paying for as little hosted as
possible? A bursty trace against the real vLLM CPU engine and a fake hosted API.

    .venv/bin/python scripts/bench_offload.py            # full run (run times:
    .venv/bin/python scripts/bench_offload.py --quick    # docs/performance.md)
    .venv/bin/python scripts/bench_offload.py --engine-url http://127.0.0.1:8101/v1
                                                          # reuse a running demo engine

1. Starts the demo engine (serving.engine.EngineProcess on the demo model, the `demo`
   alias's flags from models.yaml minus the tool-calling ones, VLLM_CPU_KVCACHE_SPACE=1)
   and a fake hosted API (scripts/benchlib/mockup.py: TTFT 300-500 ms, 50 tokens/s).
2. Measures local capacity: Poisson arrivals at doubling rates (then bisection) through a
   local-only router (the path requests take; --capacity-via engine: straight to the
   engine); the capacity is the highest rate whose p95 TTFT stays within the SLO
   (--slo-s, 1 s) without errors, for one request shape (a ~100-token prompt, 64 output
   tokens, streamed).
3. Replays one Poisson trace with bursts at 2-3x that capacity through
   `spillover serve --no-engines` in four configurations: local-only, hosted-only,
   spillover latency-first and spillover cost-first.
4. Reports per configuration TTFT p50/p95/p99, the share inside the SLO, the hosted share
   and cost, next to the oracle minimum hosted share: the trace's load above the local
   capacity, taking the larger of the open-loop capacity and the throughput the engine
   keeps with the router's max_inflight under way (measured closed-loop); prints a table
   and one JSON line (also --out), and plots load, route split and TTFT over time; both
   go to temporary files unless --publish writes docs/offload.json and docs/offload.png.

Saturation settings of the spillover configurations: --max-inflight (default: the p95 of
the requests in flight during the capacity rate's step, halved and bisected until the engine
held at that many requests keeps the SLO), --resume-below, --max-waiting.
The numbers share a 2-core machine with the engine: they are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.httpload import Pool, now
from benchlib.meter import CpuMeter
from benchlib.procs import ROOT, VENV_BIN, Children, free_port, sigterm_as_exit, wait_http
from benchlib.stats import emit, finite, pct, table

HOST = "127.0.0.1"
ALIAS = "demo"
PATH = "/v1/chat/completions"
# About 100 prompt tokens with Mistral's tokenizer.
PROMPT = ("You are a support assistant for an internal tool. Summarise the following "
          "ticket in two sentences and suggest one next step for the engineer on call. "
          "Ticket: the nightly export job failed twice this week with a timeout while "
          "writing to the reporting database; retries succeeded after about ten minutes; "
          "no data was lost but the dashboard showed stale numbers until noon.")
CONFIGS = ("local-only", "hosted-only", "spillover-latency", "spillover-cost")
TOOL_FLAGS = {"--enable-auto-tool-choice": 0, "--tool-call-parser": 1}
# exec the engine with PR_SET_PDEATHSIG (it dies with this process, however that ends)
# and, optionally, a lower CPU priority and its own CPUs.
_PDEATH_EXEC = ("import ctypes, os, signal, sys; "
                "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
                "os.nice({nice}); "
                "{cpus} and os.sched_setaffinity(0, {cpus}); "
                "os.execv(sys.argv[1], sys.argv[1:])")


def request_body(max_tokens: int) -> bytes:
    return orjson.dumps({
        "model": ALIAS, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True},
        # Random weights may hit EOS early: every request generates max_tokens.
        "ignore_eos": True,
    })


@dataclass(slots=True)
class Rec:
    t: float  # scheduled send, seconds from the start of the run
    ttft: float = math.inf  # first content event - scheduled send
    e2e: float = math.inf
    status: int = 0
    route: str = ""
    backend: str = ""
    reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


async def send(pool: Pool, payload: bytes, t0: float, at: float, limit_s: float) -> Rec:
    rec = Rec(t=at)
    scheduled = t0 + at
    try:
        async with asyncio.timeout(limit_s):
            r = await pool.post(PATH, payload, keep_events=True)
    except TimeoutError:
        rec.error = "timeout"
        return rec
    except Exception as exc:
        rec.error = type(exc).__name__
        return rec
    rec.status = r.status
    rec.route = r.headers.get(b"x-spillover-route", b"").decode()
    rec.backend = r.headers.get(b"x-spillover-backend", b"").decode()
    rec.reason = r.headers.get(b"x-spillover-reason", b"").decode()
    if r.status != 200:
        rec.error = f"status {r.status}"
        return rec
    for at_s, ev in zip(r.event_times, r.events, strict=True):
        if b'"choices":[{' in ev and math.isinf(rec.ttft):
            rec.ttft = at_s - scheduled
        if b'"usage":{' in ev:
            with contextlib.suppress(orjson.JSONDecodeError):
                usage = orjson.loads(ev).get("usage") or {}
                rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                rec.completion_tokens = int(usage.get("completion_tokens") or 0)
    if r.event_times:
        rec.e2e = r.event_times[-1] - scheduled
    if math.isinf(rec.ttft):
        rec.error = "no content event"
    return rec


async def replay(port: int, arrivals: list[float], payload: bytes, limit_s: float,
                 on_start: float | None = None) -> tuple[list[Rec], float]:
    """Open loop: every request goes at its time whatever the others do. Requests still
    unanswered `limit_s` after their time are cut off (the connection closes, which
    aborts them upstream) and count as missed."""
    pool = Pool(HOST, port)
    await pool.warm(8)
    t0 = on_start if on_start is not None else now() + 0.05
    tasks = []
    for at in arrivals:
        wait = t0 + at - now()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(send(pool, payload, t0, at, limit_s)))
    recs = list(await asyncio.gather(*tasks))
    pool.close()
    return recs, t0


# --- the engine ----------------------------------------------------------------------


async def engine_idle(base_url: str, within_s: float) -> None:
    """Until the engine runs and queues nothing (its /metrics), or within_s passed."""
    from router.routing.load import parse_vllm_metrics

    root = base_url.removesuffix("/v1")
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                m = parse_vllm_metrics((await client.get(root + "/metrics")).text)
                if m.running + m.waiting == 0:
                    return
            await asyncio.sleep(0.5)


async def sample_engine(base_url: str, t0: float, out: list[tuple[float, float, float]],
                        stop: asyncio.Event) -> None:
    from router.routing.load import parse_vllm_metrics

    root = base_url.removesuffix("/v1")
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                m = parse_vllm_metrics((await client.get(root + "/metrics")).text)
                out.append((now() - t0, m.running, m.waiting))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


async def sample_router(port: int, t0: float, out: list[tuple[float, float, bool, bool]],
                        stop: asyncio.Event) -> None:
    """The router's own view of the local engine (GET /readyz): in-flight count,
    saturated, healthy."""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                engines = (await client.get(f"http://{HOST}:{port}/readyz")).json()["engines"]
                e = engines.get("demo-local")
                if e is not None:
                    out.append((now() - t0, float(e["inflight"]), bool(e["saturated"]),
                                bool(e["healthy"])))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


def engine_flags() -> tuple[tuple[str, ...], int]:
    """The `demo` alias's extra_args minus the tool-calling ones, and its max_model_len."""
    from router.config import load_config

    dep = load_config(ROOT / "models.yaml").aliases["demo"].local[0]
    args, out, skip = list(dep.extra_args), [], 0
    for a in args:
        if skip:
            skip -= 1
            continue
        if a in TOOL_FLAGS:
            skip = TOOL_FLAGS[a]
            continue
        out.append(a)
    # What is left only configures tool-call grammars; harmless without tools.
    return tuple(out), dep.max_model_len or 2048


class Engine:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.proc: Any = None

    async def start(self, within_s: float, nice: int = 0,
                    cpus: set[int] | None = None) -> str:
        from serving.demo_model import build_demo_model
        from serving.engine import EngineProcess, EngineSpec, engine_command

        model_dir = await asyncio.to_thread(build_demo_model, ROOT / ".spillover" / "demo-model")
        flags, max_len = engine_flags()
        spec = EngineSpec(name="bench-engine", model=str(model_dir), served_model_name=ALIAS,
                          port=free_port(), max_model_len=max_len, extra_args=flags,
                          env=(("VLLM_CPU_KVCACHE_SPACE", "1"),))
        cmd = [sys.executable, "-c",
               _PDEATH_EXEC.format(nice=int(nice), cpus=sorted(cpus or ())),
               *engine_command(spec)]
        self.proc = EngineProcess(spec, log_dir=self.log_dir, command=cmd)
        await self.proc.start()
        await self.proc.wait_ready(timeout=within_s)
        return str(spec.base_url)

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop(grace=10)
            self.proc = None

    def kill_now(self) -> None:
        """Last resort from synchronous code: SIGKILL the engine's process group."""
        pid = self.proc.pid if self.proc is not None else None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


# --- capacity ------------------------------------------------------------------------


def poisson(rate: float, duration: float, rng: random.Random, start: float = 0.0) -> list[float]:
    out: list[float] = []
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= start + duration:
            return out
        out.append(t)


def inflight_at_arrivals(recs: list[Rec]) -> list[int]:
    """How many requests were under way (sent, not finished) as each one arrived."""
    spans = sorted((r.t, r.t + r.e2e) for r in recs)
    out = []
    for i, (start, _) in enumerate(spans):
        out.append(sum(1 for s, e in spans[:i] if e > start))
    return out


async def capacity(port: int, engine_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Rising Poisson rates to `port` (the engine, or a local-only router in front of
    it); the capacity is the highest rate with p95 TTFT <= SLO and no error."""
    payload = request_body(args.max_tokens)
    rng = random.Random(args.seed + 1)
    steps: list[dict[str, Any]] = []

    async def step(rate: float) -> dict[str, Any]:
        arrivals = poisson(rate, args.step_s, rng)
        recs, _ = await replay(port, arrivals, payload, args.step_s + 10)
        warm = [r for r in recs if r.t >= min(2.0, args.step_s / 4)]
        ttft = [r.ttft for r in warm]
        done = [r for r in warm if not math.isinf(r.e2e)]
        inflight = inflight_at_arrivals(recs)[len(recs) - len(warm):]
        res = {"rate": rate, "n": len(warm), "ttft_p50_s": pct(ttft, 50),
               "ttft_p95_s": pct(ttft, 95), "e2e_mean_s": sum(r.e2e for r in done)
               / max(1, len(done)), "errors": sum(1 for r in warm if r.error),
               # Requests under way when one arrives (the router's in-flight count).
               "inflight_p50": pct(inflight, 50), "inflight_p95": pct(inflight, 95),
               "loadavg_1m": round(os.getloadavg()[0], 2)}
        res["ok"] = bool(warm) and res["ttft_p95_s"] <= args.slo_s and res["errors"] == 0
        steps.append(res)
        print(f"  capacity step {rate:5.2f} req/s: n={res['n']:3d} TTFT p50 "
              f"{res['ttft_p50_s']:.3f} s, p95 {res['ttft_p95_s']:.3f} s; mean latency "
              f"{res['e2e_mean_s']:.2f} s; in flight p50 {res['inflight_p50']:.0f} p95 "
              f"{res['inflight_p95']:.0f} -> {'ok' if res['ok'] else 'over the SLO'} "
              f"(load average {res['loadavg_1m']})", flush=True)
        await engine_idle(engine_url, 120)
        return res

    # Double until the SLO breaks, then bisect between the last good and first bad rate.
    best: dict[str, Any] | None = None
    worst: dict[str, Any] | None = None
    rate = args.start_rate
    while rate <= args.max_rate:
        res = await step(rate)
        if not res["ok"]:
            worst = res
            break
        best = res
        rate = round(rate * 2, 3)
    else:
        print(f"  (--max-rate {args.max_rate:g} reached: the capacity is at least "
              f"{best['rate'] if best else 0:g} req/s)")
    if best is None:  # even the first rate was too much: go down
        rate = args.start_rate / 2
        while rate >= 0.1 and best is None:
            res = await step(rate)
            if res["ok"]:
                best = res
            else:
                worst = res
            rate /= 2
    for _ in range(args.refine_steps):
        if best is None or worst is None:
            break
        mid = round((best["rate"] + worst["rate"]) / 2, 2)
        res = await step(mid)
        if res["ok"]:
            best = res
        else:
            worst = res
    if best is None:
        raise RuntimeError("the engine cannot meet the SLO even at a trickle")
    return {"capacity_rps": best["rate"], "inflight_p95_at_capacity": best["inflight_p95"],
            "latency_at_capacity_s": best["e2e_mean_s"], "steps": steps}


async def closed_capacity(port: int, engine_url: str, concurrency: int,
                          args: argparse.Namespace) -> dict[str, Any]:
    """Throughput with exactly `concurrency` requests under way (each sender sends its next
    request when the last one ends): what the local path serves when the router caps its
    in-flight count there. Under an open loop above capacity the engine's queue grows
    without bound, and a large batch serves fewer requests a second than a capped one."""
    payload = request_body(args.max_tokens)
    pool = Pool(HOST, port)
    recs: list[Rec] = []
    t0 = now()
    warm, stop_at = t0 + 2.0, t0 + 2.0 + args.step_s

    async def sender() -> None:
        while (at := now()) < stop_at:
            rec = await send(pool, payload, t0, at - t0, args.timeout)
            if at >= warm:
                recs.append(rec)

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    pool.close()
    done = [r for r in recs if not r.error]
    res = {"concurrency": concurrency, "rps": len(done) / args.step_s,
           "ttft_p50_s": pct([r.ttft for r in recs], 50),
           "ttft_p95_s": pct([r.ttft for r in recs], 95),
           "errors": len(recs) - len(done), "loadavg_1m": round(os.getloadavg()[0], 2)}
    res["ok"] = res["ttft_p95_s"] <= args.slo_s and res["errors"] == 0
    print(f"  closed loop at {concurrency} in flight: {res['rps']:.1f} req/s, TTFT p50 "
          f"{res['ttft_p50_s']:.3f} s, p95 {res['ttft_p95_s']:.3f} s -> "
          f"{'ok' if res['ok'] else 'over the SLO'} (load average {res['loadavg_1m']})",
          flush=True)
    await engine_idle(engine_url, 120)
    return res


# --- the trace -----------------------------------------------------------------------

# (share of the trace's duration, load as a multiple of the local capacity)
SHAPE = ((0.14, 0.5), (0.12, 2.5), (0.16, 0.5), (0.10, 3.0), (0.16, 0.6), (0.12, 2.0),
         (0.20, 0.4))


@dataclass
class Trace:
    arrivals: list[float]
    segments: list[tuple[float, float, float]]  # start, end, rate
    capacity: float

    def oracle(self, capacity: float | None = None) -> dict[str, float]:
        """The least hosted share any router could get away with: in every segment, the
        arrivals beyond what the local capacity serves in that time must go hosted."""
        cap = self.capacity if capacity is None else capacity
        excess = 0.0
        for start, end, _ in self.segments:
            n = sum(1 for a in self.arrivals if start <= a < end)
            excess += max(0.0, n - cap * (end - start))
        total = max(1, len(self.arrivals))
        return {"min_hosted_share": excess / total, "min_hosted_requests": excess}


def make_trace(cap: float, duration: float, seed: int) -> Trace:
    rng = random.Random(seed)
    arrivals: list[float] = []
    segments = []
    t = 0.0
    for share, mult in SHAPE:
        d = share * duration
        arrivals += poisson(cap * mult, d, rng, start=t)
        segments.append((t, t + d, cap * mult))
        t += d
    return Trace(arrivals, segments, cap)


# --- configurations ------------------------------------------------------------------


@dataclass
class Sat:
    max_inflight: int
    resume_below: float
    max_waiting: int
    max_kv_cache: float = 0.9


def router_config(name: str, engine_url: str, hosted_url: str, sat: Sat,
                  args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from router.config import Server

    server: dict[str, Any] = {"request_timeout_s": args.timeout, "metrics_interval_s": 0.25,
                              "metrics_stale_s": 3}
    if "ledger_path" in Server.model_fields:
        server["ledger_path"] = str(tmp / f"ledger-{name}.db")
    local = {"name": "demo-local", "model": ALIAS, "license": "apache-2.0",
             "served_model_name": ALIAS, "base_url": engine_url, "max_model_len": 2048}
    if name == "local-only":  # what you have without spillover: everything queues locally
        local["saturation"] = {"max_inflight": 100000, "max_waiting": 1000000,
                               "max_kv_cache": 1.0}
    else:
        local["saturation"] = {"max_inflight": sat.max_inflight,
                               "max_waiting": sat.max_waiting,
                               "max_kv_cache": sat.max_kv_cache,
                               "resume_below": sat.resume_below}
    hosted = {"provider": "hosted", "model": "mistral-small-latest",
              "price": {"input_per_mtok": args.price_in, "output_per_mtok": args.price_out}}
    alias: dict[str, Any] = {}
    if name != "hosted-only":
        alias["local"] = [local]
    if name != "local-only":
        alias["hosted"] = [hosted]
    routing: dict[str, Any] = {"mode": "cost-first" if name == "spillover-cost"
                               else "latency-first",
                               "cost_first_max_wait_s": args.cost_first_wait}
    return {
        "server": server,
        "routing": routing,
        "providers": {"hosted": {
            "kind": "openai", "base_url": hosted_url + "/v1", "api_key_env": "BENCH_HOSTED_KEY",
            "timeouts": {"connect": 2, "read": 60, "write": 10, "pool": 5}}},
        "aliases": {ALIAS: alias},
    }


def summarise(name: str, recs: list[Rec], oracle: float, slo: float,
              price_in: float, price_out: float) -> dict[str, Any]:
    n = max(1, len(recs))
    ttft = [r.ttft for r in recs]  # failures are inf: they count against the tail
    hosted = [r for r in recs if r.route == "hosted" and not r.error]
    cost = sum(r.prompt_tokens * price_in + r.completion_tokens * price_out
               for r in hosted) / 1e6
    hosted_share = len(hosted) / n
    reasons: dict[str, int] = {}
    for r in recs:
        reasons[r.reason or r.error or "?"] = reasons.get(r.reason or r.error or "?", 0) + 1
    return {
        "config": name, "n": len(recs),
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "ttft_p99_s": pct(ttft, 99),
        "in_slo": sum(1 for r in recs if not r.error and r.ttft <= slo) / n,
        "errors": sum(1 for r in recs if r.error),
        "errors_by_kind": {k: sum(1 for r in recs if r.error == k)
                           for k in sorted({r.error for r in recs if r.error})},
        "hosted_share": hosted_share, "hosted_requests": len(hosted),
        "hosted_cost_usd": cost,
        "hosted_cost_usd_per_1k_requests": cost / n * 1000,
        "hosted_vs_oracle": hosted_share / oracle if oracle > 0 else math.nan,
        "reasons": reasons,
        "by_route": {route: {
            "n": len(rs), "in_slo": sum(1 for r in rs if r.ttft <= slo) / max(1, len(rs)),
            "ttft_p50_s": pct([r.ttft for r in rs], 50),
            "ttft_p95_s": pct([r.ttft for r in rs], 95)}
            for route in ("local", "hosted")
            if (rs := [r for r in recs if r.route == route and not r.error])},
    }


def engine_pid(base_url: str) -> int | None:
    """The process listening on the engine's port (its API server)."""
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    with contextlib.suppress(psutil.Error):
        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN:
                return int(c.pid) if c.pid is not None else None
    return None


async def start_router(name: str, kids: Children, engine_url: str, hosted_url: str,
                       sat: Sat, args: argparse.Namespace,
                       tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(json.dumps(router_config(name, engine_url, hosted_url, sat, args, tmp),
                                   indent=2))
    port = free_port()
    proc = kids.start(f"router-{name}", [
        str(VENV_BIN / "spillover"), "serve", "--no-engines", "--config", str(cfg_path),
        "--port", str(port), "--log-level", "warning"],
        env={"BENCH_HOSTED_KEY": "bench-not-a-secret"})
    try:
        await asyncio.to_thread(wait_http, f"http://{HOST}:{port}/readyz", 60, proc, name)
    except RuntimeError:
        print(kids.log_tail(f"router-{name}"), file=sys.stderr)
        raise
    await asyncio.sleep(1.0)  # a few load probes in
    return proc, port


async def run_config(name: str, kids: Children, engine_url: str, hosted_url: str,
                     hosted_pid: int, trace: Trace, sat: Sat, args: argparse.Namespace,
                     tmp: Path) -> tuple[list[Rec], list[tuple[float, float, float]],
                                         dict[str, Any]]:
    proc, port = await start_router(name, kids, engine_url, hosted_url, sat, args, tmp)
    engine_samples: list[tuple[float, float, float]] = []
    stop = asyncio.Event()
    t0 = now() + 0.2
    router_samples: list[tuple[float, float, bool, bool]] = []
    sampler = asyncio.gather(sample_engine(engine_url, t0, engine_samples, stop),
                             sample_router(port, t0, router_samples, stop))
    meter = CpuMeter({"router": proc.pid, "engine": engine_pid(engine_url),
                      "hosted": hosted_pid, "loadgen": os.getpid()})
    meter.start()
    recs, _ = await replay(port, trace.arrivals, request_body(args.max_tokens), args.timeout,
                           on_start=t0)
    cores = {k: round(v / max(1e-9, now() - t0), 2) for k, v in meter.stop().items()}
    stop.set()
    await sampler
    status: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            status = (await client.get(f"http://{HOST}:{port}/status")).json()
    kids.stop(f"router-{name}")
    # What the router said about the engine (at warning level: it going down and up).
    log = (kids.log_dir / f"router-{name}.log").read_text(errors="replace").splitlines()
    status["router_warnings"] = [ln.split(" ", 2)[-1][:200] for ln in log
                                 if " WARNING " in ln or " ERROR " in ln][:20]
    await engine_idle(engine_url, 180)
    status["cpu_cores"] = cores
    status["router_view"] = router_samples
    return recs, engine_samples, status


# --- plot ----------------------------------------------------------------------------


def plot(path: Path, trace: Trace, results: dict[str, dict[str, Any]],
         records: dict[str, list[Rec]],
         router_view: dict[str, list[tuple[float, float, bool, bool]]], slo: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CONFIGS if n in records]
    fig, axes = plt.subplots(1 + len(names), 2, figsize=(14, 3.0 * (1 + len(names))),
                             sharex=True, squeeze=False)
    end = max(trace.arrivals, default=1.0) + 5
    bin_s = 2.0
    bins = [i * bin_s for i in range(int(end // bin_s) + 2)]

    def rate(times: list[float]) -> list[float]:
        counts = [0] * (len(bins) - 1)
        for t in times:
            i = int(t // bin_s)
            if 0 <= i < len(counts):
                counts[i] += 1
        return [c / bin_s for c in counts]

    mids = [b + bin_s / 2 for b in bins[:-1]]
    ax = axes[0][0]
    ax.step(mids, rate(trace.arrivals), where="mid", label="offered load", color="black")
    xs = [x for s in trace.segments for x in (s[0], s[1])]
    ax.plot(xs, [s[2] for s in trace.segments for _ in (0, 1)], color="grey", lw=0.8,
            ls=":", label="trace rate")
    ax.axhline(trace.capacity, color="tab:red", ls="--", label="local capacity")
    ax.set_ylabel("req/s")
    ax.set_title(f"trace: {len(trace.arrivals)} requests, capacity {trace.capacity:g} req/s")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[0][1]
    for name in names:
        view = router_view.get(name) or []
        line = ax.plot([v[0] for v in view], [v[1] for v in view], lw=1, label=name)[0]
        sat = [v for v in view if v[2] or not v[3]]
        ax.scatter([v[0] for v in sat], [v[1] for v in sat], s=6, color=line.get_color())
    ax.set_ylabel("requests")
    ax.set_title("router's in-flight count to the engine (dots: saturated or down)")
    ax.legend(loc="upper right", fontsize=8)
    for row, name in enumerate(names, start=1):
        recs = records[name]
        res = results[name]
        ax = axes[row][0]
        local = rate([r.t for r in recs if r.route == "local" and not r.error])
        hosted = rate([r.t for r in recs if r.route == "hosted" and not r.error])
        failed = rate([r.t for r in recs if r.error])
        ax.stackplot(mids, local, hosted, failed, labels=["local", "hosted", "failed"],
                     colors=["tab:green", "tab:orange", "tab:red"], step="mid", alpha=0.8)
        ax.axhline(trace.capacity, color="tab:red", ls="--", lw=0.8)
        ax.set_ylabel("req/s")
        ax.set_title(f"{name}: hosted {100 * res['hosted_share']:.0f}% "
                     f"(oracle {100 * res['oracle_share']:.0f}%), "
                     f"${res['hosted_cost_usd']:.5f}")
        ax.legend(loc="upper right", fontsize=8)
        ax = axes[row][1]
        for route, color in (("local", "tab:green"), ("hosted", "tab:orange")):
            pts = [(r.t, r.ttft) for r in recs if r.route == route and not r.error]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, color=color,
                       label=route)
        bad = [r.t for r in recs if r.error]
        if bad:
            ax.scatter(bad, [slo * 20] * len(bad), s=8, marker="x", color="tab:red",
                       label="failed")
        ax.axhline(slo, color="black", ls="--", lw=0.8, label="SLO")
        ax.set_yscale("log")
        ax.set_ylabel("TTFT s")
        ax.set_title(f"{name}: {100 * res['in_slo']:.1f}% inside the SLO, "
                     f"p99 {res['ttft_p99_s']:.2f} s")
        ax.legend(loc="upper right", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("time s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------


async def run(args: argparse.Namespace, kids: Children, engine: Engine,
              tmp: Path) -> dict[str, Any]:
    t_start = time.monotonic()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          "(other work running here skews every number)", flush=True)
    hosted_port = free_port()
    hosted = kids.start("hosted", [
        sys.executable, str(ROOT / "scripts/benchlib/mockup.py"), "--port", str(hosted_port),
        "--ttft-s", str(args.hosted_ttft_s), "--ttft-jitter-s", str(args.hosted_jitter_s),
        "--tok-per-s", str(args.hosted_tok_s), "--seed", str(args.seed)])
    hosted_url = f"http://{HOST}:{hosted_port}"
    await asyncio.to_thread(wait_http, hosted_url + "/health", 30, hosted, "hosted")
    if args.engine_url:
        engine_url = args.engine_url.rstrip("/")
    else:
        print("starting the demo engine (about a minute)...", flush=True)
        engine_url = await engine.start(args.engine_timeout, args.engine_nice,
                                        args.engine_cpus)
    timings: dict[str, float] = {"engine_start_s": time.monotonic() - t_start}
    await engine_idle(engine_url, 60)
    # A few requests first: the first ones after start pay for compilation and caches.
    warm_pool = Pool(HOST, int(engine_url.rsplit(":", 1)[1].split("/")[0]))
    for _ in range(3):
        await warm_pool.post(PATH, request_body(args.max_tokens))
    warm_pool.close()

    t = time.monotonic()
    if args.capacity:
        cap = {"capacity_rps": args.capacity, "inflight_p95_at_capacity": None,
               "latency_at_capacity_s": None, "steps": [], "given": True}
    else:
        via = ("a local-only router" if args.capacity_via == "router"
               else "straight to the engine")
        print(f"local capacity at p95 TTFT <= {args.slo_s:g} s ({args.max_tokens} output "
              f"tokens, streamed, {via}):", flush=True)
        if args.capacity_via == "router":
            _, port = await start_router("local-only", kids, engine_url, hosted_url,
                                         Sat(1, 0.7, 0), args, tmp)
            cap = await capacity(port, engine_url, args)
            kids.stop("router-local-only")
        else:
            cap = await capacity(int(engine_url.rsplit(":", 1)[1].split("/")[0]), engine_url,
                                 args)
        cap["via"] = args.capacity_via
    c = float(cap["capacity_rps"])
    if args.max_inflight:
        max_inflight = args.max_inflight
    elif cap.get("inflight_p95_at_capacity"):
        # The in-flight level the local path sustained within the SLO.
        max_inflight = max(1, math.ceil(cap["inflight_p95_at_capacity"]))
    else:
        max_inflight = 4
    sat = Sat(max_inflight=max_inflight, resume_below=args.resume_below,
              max_waiting=args.max_waiting)
    if not args.capacity and args.capacity_via == "router":
        # What the local path serves with the router's cap in place. A cap is only as
        # good as the engine kept full at it: the open loop's in-flight count at capacity
        # can sit at the edge of a cliff (a faster router lets the engine batch more and
        # its TTFT turn steep), so unless --max-inflight was given, halve the cap until
        # the engine held at it meets the SLO, then bisect back up.
        _, port = await start_router("local-only", kids, engine_url, hosted_url, sat, args,
                                     tmp)
        good: dict[str, Any] | None = None
        bad: int | None = None
        trial = max_inflight
        for _ in range(8):  # bounded: a few minutes at most
            res = await closed_capacity(port, engine_url, trial, args)
            if res["ok"]:
                good = res
            else:
                bad = trial
            if args.max_inflight or (good is not None and bad is None):
                break
            if good is None:
                if trial == 1:
                    break
                trial = max(1, trial // 2)
            else:
                assert bad is not None
                nxt = (good["concurrency"] + bad) // 2
                if nxt <= good["concurrency"] or bad - good["concurrency"] <= max(
                        1, good["concurrency"] // 8):
                    break
                trial = nxt
        kids.stop("router-local-only")
        cap["capped"] = good if good is not None else res
        if good is not None and not args.max_inflight:
            max_inflight = good["concurrency"]
            sat = Sat(max_inflight=max_inflight, resume_below=args.resume_below,
                      max_waiting=args.max_waiting)
    timings["capacity_s"] = time.monotonic() - t
    trace = make_trace(c, args.trace_s, args.seed)
    oracle = trace.oracle()
    capped = cap.get("capped")
    if capped and capped["ok"] and capped["rps"] > c:
        # The tighter bound: the engine's throughput with at most max_inflight under way.
        oracle_capped = trace.oracle(capped["rps"])
    else:
        oracle_capped = oracle
    oracle["min_hosted_share_capped"] = oracle_capped["min_hosted_share"]
    oracle["capped_capacity_rps"] = float(capped["rps"]) if capped else math.nan
    bound = min(oracle["min_hosted_share"], oracle_capped["min_hosted_share"])
    print(f"capacity {c:g} req/s (open loop at the SLO); "
          + (f"{capped['rps']:.1f} req/s with {max_inflight} in flight; " if capped else "")
          + f"trace {len(trace.arrivals)} requests over {args.trace_s:g} s; oracle minimum "
          f"hosted share {100 * oracle['min_hosted_share']:.1f}% (open-loop capacity), "
          f"{100 * oracle_capped['min_hosted_share']:.1f}% (capped throughput); spillover "
          f"saturation {asdict(sat)}", flush=True)

    results: dict[str, dict[str, Any]] = {}
    records: dict[str, list[Rec]] = {}
    router_ts: dict[str, list[tuple[float, float, bool, bool]]] = {}
    for name in args.configs:
        t = time.monotonic()
        print(f"replaying the trace: {name}...", flush=True)
        recs, samples, status = await run_config(name, kids, engine_url, hosted_url,
                                                 hosted.pid, trace, sat, args, tmp)
        res = summarise(name, recs, bound, args.slo_s, args.price_in, args.price_out)
        res["oracle_share"] = bound
        today = status.get("today") if isinstance(status, dict) else None
        if isinstance(today, dict) and "hosted_cost_usd" in today:
            res["router_hosted_cost_usd"] = today["hosted_cost_usd"]
        res["cpu_cores"] = status.get("cpu_cores")
        res["router_warnings"] = [w for w in status.get("router_warnings", [])
                                  if "NO CALLERS CONFIGURED" not in w]
        view = status.get("router_view") or []
        router_ts[name] = view
        if view:
            res["router_saw_saturated_share"] = sum(1 for v in view if v[2]) / len(view)
            res["router_saw_down_share"] = sum(1 for v in view if not v[3]) / len(view)
        # Other work on the machine shows here: a replay under a load average well above
        # the core count measured the neighbours too.
        res["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        # vLLM's own gauges (they lag): the most requests it held at once.
        res["engine_running_max"] = max((x[1] for x in samples), default=None)
        res["engine_waiting_max"] = max((x[2] for x in samples), default=None)
        results[name], records[name] = res, recs
        timings[f"{name}_s"] = time.monotonic() - t
        print(f"  {name}: {100 * res['in_slo']:.1f}% in SLO, p95 TTFT "
              f"{res['ttft_p95_s']:.3f} s, hosted {100 * res['hosted_share']:.1f}%; CPU cores "
              f"used {res['cpu_cores']}", flush=True)

    rows = []
    for name, r in results.items():
        rows.append([name, r["n"], r["ttft_p50_s"], r["ttft_p95_s"], r["ttft_p99_s"],
                     f"{100 * r['in_slo']:.1f}%", r["errors"],
                     f"{100 * r['hosted_share']:.1f}%",
                     f"{r['hosted_vs_oracle']:.2f}x", f"{r['hosted_cost_usd']:.6f}"])
    print(f"\nTrace replay (SLO: TTFT <= {args.slo_s:g} s; oracle minimum hosted share "
          f"{100 * bound:.1f}%; TTFT in s)")
    print(table(["config", "n", "TTFT p50", "p95", "p99", "in SLO", "errors", "hosted",
                 "vs oracle", "hosted $"], rows))
    for name, r in results.items():
        routes = ", ".join(f"{k} {100 * v['in_slo']:.1f}% in SLO (p95 {v['ttft_p95_s']:.2f} s)"
                           for k, v in r["by_route"].items())
        print(f"  {name}: {routes}; reasons {json.dumps(r['reasons'])}")
    if args.plot:
        plot(args.plot, trace, results, records, router_ts, args.slo_s)
        print(f"plot: {args.plot}")

    spill = [results[n] for n in ("spillover-latency", "spillover-cost") if n in results]
    targets = {
        f"{r['config']}_in_slo_ge_99pct": r["in_slo"] >= 0.99 for r in spill
    } | {
        f"{r['config']}_hosted_le_1.2x_oracle": r["hosted_vs_oracle"] <= 1.2 for r in spill
    }
    if "local-only" in results:
        targets["local_only_misses_slo"] = results["local-only"]["in_slo"] < 0.99
    if "hosted-only" in results:
        targets["hosted_only_pays_all"] = results["hosted-only"]["hosted_share"] >= 0.99
    return {
        "bench": "offload", "quick": args.quick, "slo_ttft_s": args.slo_s,
        "max_tokens": args.max_tokens, "capacity": cap, "saturation": asdict(sat),
        "cost_first_max_wait_s": args.cost_first_wait,
        "split_cpus": args.split_cpus, "engine_nice": args.engine_nice,
        "hosted_fake": {"ttft_s": [args.hosted_ttft_s, args.hosted_ttft_s + args.hosted_jitter_s],
                        "tok_per_s": args.hosted_tok_s,
                        "price_per_mtok": [args.price_in, args.price_out]},
        "trace": {"requests": len(trace.arrivals), "duration_s": args.trace_s,
                  "segments": [[round(a, 2), round(b, 2), round(r, 3)]
                               for a, b, r in trace.segments], **oracle},
        "results": results, "targets_met": targets,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run (about 7 minutes)")
    p.add_argument("--engine-url", help="use this running engine (its /v1 URL) instead of "
                   "starting one; it must serve the demo model as 'demo'")
    p.add_argument("--engine-timeout", type=float, default=900)
    p.add_argument("--split-cpus", action="store_true",
                   help="the engine on the last CPU, the router, the fake hosted API and the "
                   "load generator on the others (as on a GPU host, where the model does not "
                   "eat the router's CPU); default: everything shares every CPU")
    p.add_argument("--engine-nice", type=int, default=0,
                   help="start the engine at this nice level: on a machine this small the "
                   "engine and the router share two cores, which a GPU host does not")
    p.add_argument("--slo-s", type=float, default=1.0, help="TTFT SLO")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--capacity", type=float, help="skip the capacity run, use this req/s")
    p.add_argument("--capacity-via", choices=("router", "engine"), default="router",
                   help="measure the local capacity through a local-only router (the path "
                   "requests take; default) or straight to the engine")
    p.add_argument("--start-rate", type=float, default=2.0)
    p.add_argument("--max-rate", type=float, default=64.0)
    p.add_argument("--step-s", type=float, default=20.0, help="seconds per capacity step")
    p.add_argument("--refine-steps", type=int, default=2,
                   help="bisection steps between the last rate within the SLO and the first "
                   "over it (the rates double until one is over)")
    p.add_argument("--trace-s", type=float, default=150.0)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--max-inflight", type=int, help="spillover saturation.max_inflight "
                   "(default: the p95 of requests in flight at the capacity rate)")
    p.add_argument("--resume-below", type=float, default=0.7)
    p.add_argument("--max-waiting", type=int, default=0)
    p.add_argument("--cost-first-wait", type=float, default=0.3,
                   help="routing.cost_first_max_wait_s of the cost-first configuration")
    p.add_argument("--hosted-ttft-s", type=float, default=0.3)
    p.add_argument("--hosted-jitter-s", type=float, default=0.2)
    p.add_argument("--hosted-tok-s", type=float, default=50.0)
    p.add_argument("--price-in", type=float, default=0.10, help="USD per million tokens")
    p.add_argument("--price-out", type=float, default=0.30, help="USD per million tokens")
    p.add_argument("--timeout", type=float, default=90.0,
                   help="a request unanswered this long after its time counts as missed")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--plot", type=Path,
                   help="write the plot here (default: a temporary file, so a run leaves the "
                        "repository as it was)")
    p.add_argument("--out", type=Path, help="also write the figures here (default: temporary)")
    p.add_argument("--publish", action="store_true",
                   help="write the figures and the plot to docs/offload.json and "
                        "docs/offload.png, the files the README quotes")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args()
    scratch = Path(tempfile.gettempdir())
    if args.plot is None:
        args.plot = ROOT / "docs" / "offload.png" if args.publish else scratch / "offload.png"
    if args.out is None:
        args.out = (ROOT / "docs" / "offload.json" if args.publish
                    else scratch / "spillover-bench-offload.json")
    if args.quick:
        args.step_s, args.trace_s = 10.0, 60.0
    args.engine_cpus = split_cpus(p) if args.split_cpus else None
    return run_on_engine("spillover-offload-", args.keep_logs, args.out,
                         lambda kids, engine, tmp: run(args, kids, engine, tmp))


def split_cpus(p: argparse.ArgumentParser) -> set[int]:
    """--split-cpus: the last CPU for the engine (returned), the others for this process
    and everything it starts (routers, fakes, the load)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        p.error("--split-cpus needs at least 2 CPUs")
    os.sched_setaffinity(0, set(cpus[:-1]))  # inherited by the routers and the fakes
    return {cpus[-1]}


def run_on_engine(prefix: str, keep_logs: bool, out_path: Path,
                  body: Callable[[Children, Engine, Path], Awaitable[dict[str, Any]]]) -> int:
    """Run a benchmark's body beside one demo engine and its children, stopping them
    however it ends (Ctrl-C, SIGTERM, an error), then print and write its figures."""
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    engine = Engine(tmp / "logs")
    try:
        with sigterm_as_exit(), Children(tmp / "logs") as kids:
            async def go() -> dict[str, Any]:
                try:
                    return await body(kids, engine, tmp)
                finally:
                    await engine.stop()

            out = uvloop.run(go())
    except KeyboardInterrupt:
        print("interrupted; children stopped", file=sys.stderr)
        return 130
    finally:
        engine.kill_now()
        if keep_logs:
            print(f"logs in {tmp}/logs", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print("\ntargets:", json.dumps(out["targets_met"]))
    emit(finite(out), out_path)
    print(f"figures written to {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

