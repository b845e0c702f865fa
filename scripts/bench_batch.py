#!/usr/bin/env python3
"""Does the Batch API fill the local engine with work that can wait, keep interactive
latency, and pay hosted only for what the deadline forces? The real vLLM CPU engine, a
fake hosted API, interactive traffic and a batch, sent two ways in one run.

    .venv/bin/python scripts/bench_batch.py            # full run (about 10 minutes)
    .venv/bin/python scripts/bench_batch.py --quick    # about 6 minutes, a smaller batch
    .venv/bin/python scripts/bench_batch.py --baseline --window-s 150   # + the trace alone
    .venv/bin/python scripts/bench_batch.py --publish  # docs/batch.json, docs/batch.png

1. Starts the demo engine as spillover starts its engines (`--scheduling-policy
   priority`; scripts/bench_offload.py's Engine) and a fake hosted API
   (scripts/benchlib/mockup.py: TTFT 300-500 ms, 50 tokens/s).
2. Measures the local capacity for the interactive shape (Poisson rates straight to the
   engine, the highest with p95 TTFT within --slo-s; bench_offload's capacity()) and the
   throughput with --max-inflight requests held under way (closed loop).
3. Builds one interactive trace (Poisson at --load of the capacity, with a burst at
   --burst times it) of --window-s seconds, and a batch of N lines sized so that the
   engine's throughput left over by the interactive traffic serves about 1/--fill of it
   in the window: local capacity alone almost meets the deadline.
4. Replays, each through its own `spillover serve --no-engines` (same config: saturation
   max_inflight, batch_below; the hosted offering with a price and a batch_price):
   (a) the batch as ordinary concurrent requests on /v1/chat/completions
       (--naive-concurrency at once, what a client does today), next to the trace;
   (b) the batch as a JSONL file through /v1/files and /v1/batches with
       completion_window = the window, next to the same trace.
5. Reports interactive TTFT p50/p95 and the share inside the SLO, the batch's lines
   served locally and hosted and the hosted cost (from the router's ledger,
   /v1/usage?group_by=batch,route,priority), the engine busy share (vLLM /metrics
   num_requests_running > 0, sampled every 0.5 s) while batch work was pending, and
   whether the batch finished by its deadline (and, with --baseline, the share inside
   the SLO of the interactive trace alone: what the machine gives before any batch);
   a table, one JSON line, and a plot, to
   temporary files unless --publish.

The SLO: an interactive request's time to first token, measured by the client from its
scheduled send (so queueing anywhere counts), at most --slo-s (1 s, absolute; the same
bound the capacity steps use, and the router's batches.interactive_ttft_slo_ms in this
run). The unloaded TTFT (one request at a time, straight to the engine) is reported for
context. Engine busy: the share of 0.5 s samples, while batch work was pending, in which
vLLM's num_requests_running > 0, and (cross-check) in which the router had a request in
flight to the engine (its /readyz count).

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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_offload import (
    ALIAS,
    HOST,
    PATH,
    PROMPT,
    Engine,
    Rec,
    capacity,
    closed_capacity,
    engine_idle,
    poisson,
    replay,
    request_body,
    run_on_engine,
    sample_engine,
    sample_router,
    split_cpus,
)
from benchlib.httpload import Pool, now
from benchlib.procs import ROOT, VENV_BIN, Children, free_port, wait_http
from benchlib.stats import pct, table

PHASES = ("a-chat-completions", "b-batch-api")


def batch_line_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": ALIAS, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Ticket #{i}. {PROMPT}"}]}


# --- the trace -----------------------------------------------------------------------


@dataclass
class Trace:
    arrivals: list[float]
    segments: list[tuple[float, float, float]]  # start, end, rate


def make_trace(rate: float, burst: float, window: float, seed: int) -> Trace:
    """Poisson at `rate`, with a burst at `burst` x rate over 10% of the window, a third
    of the way in."""
    rng = random.Random(seed)
    shape = ((0.3, 1.0), (0.1, burst), (0.6, 1.0))
    arrivals: list[float] = []
    segments = []
    t = 0.0
    for share, mult in shape:
        d = share * window
        arrivals += poisson(rate * mult, d, rng, start=t)
        segments.append((t, t + d, rate * mult))
        t += d
    return Trace(arrivals, segments)


# --- the router ----------------------------------------------------------------------


def router_config(name: str, engine_url: str, hosted_url: str, args: argparse.Namespace,
                  tmp: Path) -> dict[str, Any]:
    local = {"name": "demo-local", "model": ALIAS, "license": "apache-2.0",
             "served_model_name": ALIAS, "base_url": engine_url, "max_model_len": 2048,
             # The bench's engine runs priority scheduling as spillover starts its own.
             "scheduling_policy": "priority",
             "saturation": {"max_inflight": args.max_inflight, "max_waiting": 0,
                            # None: the router's default (the hard ceiling under the
                            # scheduler's adaptive batch concurrency)
                            **given(batch_below=args.batch_below)}}
    hosted = {"provider": "hosted", "model": "mistral-small-latest",
              "price": {"input_per_mtok": args.price_in, "output_per_mtok": args.price_out},
              "batch_price": {"input_per_mtok": args.price_in * args.batch_discount,
                              "output_per_mtok": args.price_out * args.batch_discount}}
    return {
        "server": {"request_timeout_s": args.timeout, "metrics_interval_s": 0.25,
                   "metrics_stale_s": 3, "ledger_path": str(tmp / f"ledger-{name}.db")},
        "routing": {"mode": "latency-first"},
        "providers": {"hosted": {
            "kind": "openai", "base_url": hosted_url + "/v1", "api_key_env": "BENCH_HOSTED_KEY",
            "timeouts": {"connect": 2, "read": 60, "write": 10, "pool": 5}}},
        "aliases": {ALIAS: {"local": [local], "hosted": [hosted]}},
        # The router's defaults unless a flag says otherwise; the interactive SLO the
        # scheduler guards is the bench's own (--slo-s), stated, not tuned.
        "batches": {"data_dir": str(tmp / f"batches-{name}"),
                    "interactive_ttft_slo_ms": args.slo_s * 1000,
                    **given(local_concurrency=args.local_concurrency,
                            hosted_concurrency=args.hosted_concurrency,
                            deadline_margin=args.deadline_margin)},
    }


def given(**values: Any) -> dict[str, Any]:
    """The settings a flag gave: the others stay the router's defaults."""
    return {k: v for k, v in values.items() if v is not None}


async def start_router(name: str, kids: Children, engine_url: str, hosted_url: str,
                       args: argparse.Namespace, tmp: Path) -> int:
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(json.dumps(router_config(name, engine_url, hosted_url, args, tmp)))
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
    return port


# --- the batch, two ways -------------------------------------------------------------


@dataclass(slots=True)
class Line:
    done_at: float = math.inf  # seconds from the phase's start
    route: str = ""
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def batch_as_requests(port: int, n: int, args: argparse.Namespace,
                            t0: float) -> list[Line]:
    """What a client does today: every line an ordinary request, a fixed number at once."""
    pool = Pool(HOST, port)
    lines = [Line() for _ in range(n)]
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            body = orjson.dumps(batch_line_body(i, args.max_tokens))
            rec = lines[i]
            try:
                async with asyncio.timeout(args.timeout):
                    r = await pool.post(PATH, body)
            except Exception:  # a timeout or a broken connection: the line failed
                rec.done_at = now() - t0
                continue
            rec.done_at = now() - t0
            rec.status = r.status
            rec.route = r.headers.get(b"x-spillover-route", b"").decode()
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                usage = orjson.loads(r.body).get("usage") or {}
                rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                rec.completion_tokens = int(usage.get("completion_tokens") or 0)

    await asyncio.gather(*(worker() for _ in range(args.naive_concurrency)))
    pool.close()
    return lines


async def batch_via_api(port: int, n: int, args: argparse.Namespace, t0: float,
                        progress: list[tuple[float, int, int]]) -> dict[str, Any]:
    """Upload the lines as JSONL, create a batch with the window as its completion_window,
    poll it to its end. `progress`: (t, completed, failed) at each poll."""
    jsonl = b"".join(orjson.dumps({"custom_id": f"line-{i}", "method": "POST", "url": PATH,
                                   "body": batch_line_body(i, args.max_tokens)}) + b"\n"
                     for i in range(n))
    base = f"http://{HOST}:{port}"
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        f = await client.post(base + "/v1/files", data={"purpose": "batch"},
                              files={"file": ("batch.jsonl", jsonl, "application/jsonl")})
        f.raise_for_status()
        b = await client.post(base + "/v1/batches", json={
            "input_file_id": f.json()["id"], "endpoint": PATH,
            "completion_window": f"{int(args.window_s)}s"})
        b.raise_for_status()
        batch = b.json()
        created_rel = now() - t0
        end_by = now() + args.window_s + args.timeout + 60
        sched: list[tuple[Any, ...]] = []
        while batch["status"] not in ("completed", "expired", "failed", "cancelled"):
            if now() > end_by:
                batch["bench_error"] = "the batch did not end within window + timeout + 60 s"
                break
            await asyncio.sleep(1.0)
            with contextlib.suppress(httpx.HTTPError):
                batch = (await client.get(f"{base}/v1/batches/{batch['id']}")).json()
                rc = batch.get("request_counts") or {}
                progress.append((now() - t0, int(rc.get("completed", 0)),
                                 int(rc.get("failed", 0))))
                # The scheduler's view: adaptive local concurrency, lines in flight, risk,
                # the floor a risk raised under the concurrency, and the hosted plan's
                # inputs and outcome (local pace, lines hosted must take, shortfall).
                state = batch.get("spillover") or {}
                if state:
                    sched.append((now() - t0, state.get("local_concurrency_allowed"),
                                  state.get("local_in_flight"), state.get("hosted_in_flight"),
                                  bool(state.get("deadline_at_risk")),
                                  state.get("local_concurrency_floor"),
                                  state.get("local_pace_per_s"), state.get("hosted_needed"),
                                  state.get("projected_shortfall")))
        batch["bench_schedule"] = sched
        batch["bench_created_rel_s"] = created_rel
        batch["bench_ended_rel_s"] = now() - t0
        return dict(batch)


async def ledger(port: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        r = await client.get(f"http://{HOST}:{port}/v1/usage",
                             params={"group_by": "batch,route,priority"})
        r.raise_for_status()
        return list(r.json()["data"])


async def hosted_stats(url: str) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        return dict((await client.get(url + "/stats")).json())


# --- one phase -----------------------------------------------------------------------


def busy_share(samples: list[tuple[float, float, float]], start: float, end: float) -> float:
    inside = [s for s in samples if start <= s[0] <= end]
    return sum(1 for s in inside if s[1] > 0) / len(inside) if inside else math.nan


def interactive_summary(recs: list[Rec], slo: float) -> dict[str, Any]:
    ttft = [r.ttft for r in recs]
    n = max(1, len(recs))
    return {"n": len(recs), "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "ttft_p99_s": pct(ttft, 99),
            "in_slo": sum(1 for r in recs if not r.error and r.ttft <= slo) / n,
            "errors": sum(1 for r in recs if r.error),
            "hosted": sum(1 for r in recs if r.route == "hosted" and not r.error),
            # Where the misses were: on the engine, or hosted (the fake answers in
            # 0.3-0.5 s: a miss there is the machine's, not the engine's).
            **{f"in_slo_{route}": (sum(1 for r in recs if r.route == route and not r.error
                                       and r.ttft <= slo)
                                   / max(1, sum(1 for r in recs if r.route == route)))
               for route in ("local", "hosted")}}


async def run_phase(name: str, kids: Children, engine_url: str, hosted_url: str,
                    trace: Trace, n: int, args: argparse.Namespace,
                    tmp: Path) -> dict[str, Any]:
    port = await start_router(name, kids, engine_url, hosted_url, args, tmp)
    before = await hosted_stats(hosted_url)
    samples: list[tuple[float, float, float]] = []
    stop = asyncio.Event()
    t0 = now() + 0.3
    router_view: list[tuple[float, float, bool, bool]] = []
    sampler = asyncio.gather(sample_engine(engine_url, t0, samples, stop),
                             sample_router(port, t0, router_view, stop))
    interactive = asyncio.create_task(replay(port, trace.arrivals, request_body(
        args.max_tokens), args.timeout, on_start=t0))
    await asyncio.sleep(max(0.0, t0 - now()))
    out: dict[str, Any] = {"phase": name, "lines": n}
    progress: list[tuple[float, int, int]] = []
    if name.startswith("a-"):
        lines = await batch_as_requests(port, n, args, t0)
        ok = [ln for ln in lines if ln.status == 200]
        last = max((ln.done_at for ln in lines), default=math.inf)
        out.update({
            "batch_status": "completed" if len(ok) == n else "partly failed",
            "batch_ok": len(ok), "batch_local": sum(1 for ln in ok if ln.route == "local"),
            "batch_hosted": sum(1 for ln in ok if ln.route == "hosted"),
            "batch_end_s": last, "batch_pending_s": [0.0, last],
            "deadline_met": len(ok) == n and last <= args.window_s,
            "batch_done_at": sorted((ln.done_at, ln.route) for ln in ok)})
    else:
        batch = await batch_via_api(port, n, args, t0, progress)
        rc = batch.get("request_counts") or {}
        created = int(batch.get("created_at") or 0)
        finished = int(batch.get("completed_at") or batch.get("expired_at")
                       or batch.get("failed_at") or 0)
        start_rel = float(batch["bench_created_rel_s"])
        end_rel = float(batch["bench_ended_rel_s"])
        out.update({
            "batch_id": batch.get("id"), "batch_status": batch.get("status"),
            "request_counts": rc, "batch_ok": int(rc.get("completed", 0)),
            "batch_end_s": end_rel, "batch_pending_s": [start_rel, end_rel],
            "batch_seconds_by_its_timestamps": finished - created if finished else None,
            # completed_at has one-second resolution: a second of slack.
            "deadline_met": (batch.get("status") == "completed"
                             and int(rc.get("completed", 0)) == n
                             and finished - created <= args.window_s + 1),
            "progress": progress, "bench_error": batch.get("bench_error"),
            "schedule": batch.get("bench_schedule") or [],
            "deadline_at_risk_seen": any(x[4] for x in batch.get("bench_schedule") or []),
            # Seconds (1 s polls) in which a projected miss held a floor under the
            # batch concurrency.
            "deadline_floor_s": sum(1 for x in batch.get("bench_schedule") or []
                                    if len(x) > 5 and (x[5] or 0) > 0)})
    recs, _ = await interactive
    stop.set()
    await sampler
    rows = await ledger(port)
    after = await hosted_stats(hosted_url)
    kids.stop(f"router-{name}")
    batch_rows = [r for r in rows if r.get("batch")]
    if name.startswith("b-"):
        out["batch_local"] = sum(int(r["requests"]) - int(r.get("errors") or 0)
                                 for r in batch_rows if r.get("route") == "local")
        out["batch_hosted"] = sum(int(r["requests"]) - int(r.get("errors") or 0)
                                  for r in batch_rows if r.get("route") == "hosted")
        out["batch_hosted_cost_usd"] = sum(float(r.get("cost_usd") or 0)
                                           for r in batch_rows if r.get("route") == "hosted")
        out["interactive_hosted_cost_usd"] = sum(
            float(r.get("cost_usd") or 0) for r in rows
            if not r.get("batch") and r.get("route") == "hosted")
    else:
        # Every request here is interactive class: the batch's share of the hosted bill is
        # its own hosted lines at the price the ledger charged (the offering's price).
        done = [ln for ln in lines if ln.status == 200 and ln.route == "hosted"]
        out["batch_hosted_cost_usd"] = sum(ln.prompt_tokens * args.price_in
                                           + ln.completion_tokens * args.price_out
                                           for ln in done) / 1e6
        out["interactive_hosted_cost_usd"] = sum(
            r.prompt_tokens * args.price_in + r.completion_tokens * args.price_out
            for r in recs if r.route == "hosted" and not r.error) / 1e6
    out["ledger_hosted_cost_usd"] = sum(float(r.get("cost_usd") or 0) for r in rows
                                        if r.get("route") == "hosted")
    out["ledger"] = rows
    out["hosted_api_requests"] = after["requests"] - before["requests"]
    start, end = out["batch_pending_s"]
    out["engine_busy_while_batch_pending"] = busy_share(samples, start, end)
    # Cross-check: the router's own count of requests in flight to the engine (/readyz).
    out["router_inflight_while_batch_pending"] = busy_share(
        [(t, n, 0.0) for t, n, _, _ in router_view], start, end)
    out["router_inflight_mean_while_batch_pending"] = (
        sum(n for t, n, _, _ in router_view if start <= t <= end)
        / max(1, sum(1 for t, *_ in router_view if start <= t <= end)))
    out["interactive"] = interactive_summary(recs, args.slo_s)
    out["interactive_ttft"] = [(r.t, r.ttft, r.route) for r in recs]
    out["engine_samples"] = samples
    out["router_view"] = [(t, n) for t, n, _, _ in router_view]
    await engine_idle(engine_url, 180)
    return out


async def run_alone(kids: Children, engine_url: str, hosted_url: str, trace: Trace,
                    args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The interactive trace alone through the same router, no batch: what this machine
    gives the SLO before any batch work (the reference for (a) and (b))."""
    port = await start_router("alone", kids, engine_url, hosted_url, args, tmp)
    recs, _ = await replay(port, trace.arrivals, request_body(args.max_tokens), args.timeout,
                           on_start=now() + 0.3)
    kids.stop("router-alone")
    await engine_idle(engine_url, 180)
    return {"phase": "interactive-alone", "interactive": interactive_summary(recs, args.slo_s)}


# --- plot ----------------------------------------------------------------------------


def plot(path: Path, results: dict[str, dict[str, Any]], trace: Trace,
         args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(13, 9), sharex=True)
    for col, name in enumerate(PHASES):
        res = results[name]
        title = ("(a) batch as concurrent /v1/chat/completions" if name.startswith("a-")
                 else "(b) batch through /v1/batches")
        ax = axes[0][col]
        for route, colour in (("local", "tab:blue"), ("hosted", "tab:orange")):
            pts = [(t, min(ttft, 10.0)) for t, ttft, r in res["interactive_ttft"]
                   if r == route]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=6, c=colour, label=f"interactive {route}")
        missed = [(t, 10.0) for t, ttft, r in res["interactive_ttft"] if r not in
                  ("local", "hosted")]
        if missed:
            ax.scatter(*zip(*missed, strict=True), s=10, c="red", marker="x", label="failed")
        ax.axhline(args.slo_s, color="grey", ls="--", lw=1, label="SLO")
        for s, e, rate in trace.segments:
            if rate > trace.segments[0][2]:
                ax.axvspan(s, e, color="grey", alpha=0.12, label="burst")
        i = res["interactive"]
        ax.set_title(f"{title}\ninteractive TTFT p95 {i['ttft_p95_s']:.2f} s, "
                     f"{100 * i['in_slo']:.1f}% in SLO", fontsize=9)
        ax.set_ylabel("TTFT (s)")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper right")
        ax = axes[1][col]
        if name.startswith("a-"):
            for route, colour in (("local", "tab:blue"), ("hosted", "tab:orange")):
                ts = [t for t, r in res["batch_done_at"] if r == route]
                ax.step(ts, range(1, len(ts) + 1), where="post", c=colour,
                        label=f"batch lines {route}")
        else:
            prog = res["progress"]
            if prog:
                ax.step([p[0] for p in prog], [p[1] for p in prog], where="post",
                        c="tab:green", label="batch lines completed")
        ax.axvline(args.window_s, color="red", ls="--", lw=1, label="deadline")
        ax.axhline(res["lines"], color="grey", ls=":", lw=1, label=f"{res['lines']} lines")
        ax.set_title(f"batch: {res['batch_local']} local, {res['batch_hosted']} hosted, "
                     f"hosted ${res['batch_hosted_cost_usd']:.5f}, deadline "
                     f"{'met' if res['deadline_met'] else 'missed'}", fontsize=9)
        ax.set_ylabel("lines")
        ax.legend(fontsize=7, loc="lower right")
        ax = axes[2][col]
        samples = res["engine_samples"]
        ax.plot([s[0] for s in samples], [s[1] for s in samples], lw=0.8, label="running")
        ax.plot([s[0] for s in samples], [s[2] for s in samples], lw=0.8, label="waiting")
        view = res["router_view"]
        ax.plot([v[0] for v in view], [v[1] for v in view], lw=0.8, alpha=0.7,
                label="router's in flight to it")
        sched = res.get("schedule") or []
        if sched:
            ax.step([x[0] for x in sched], [x[1] for x in sched], where="post", lw=0.8,
                    c="tab:purple", label="batch concurrency allowed (adaptive)")
            floors = [(x[0], x[5] or 0) for x in sched if len(x) > 5]
            if any(f for _, f in floors):
                ax.step([f[0] for f in floors], [f[1] for f in floors], where="post",
                        lw=0.8, ls="--", c="tab:purple",
                        label="its floor (deadline at risk)")
        s0, s1 = res["batch_pending_s"]
        ax.axvspan(s0, s1, color="tab:green", alpha=0.08, label="batch pending")
        busy = 100 * res["engine_busy_while_batch_pending"]
        ax.set_title(f"engine (vLLM /metrics): busy {busy:.0f}% of the time while batch "
                     "work was pending", fontsize=9)
        ax.set_ylabel("requests")
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# --- the run -------------------------------------------------------------------------


async def run(args: argparse.Namespace, kids: Children, engine: Engine,
              tmp: Path) -> dict[str, Any]:
    t_start = time.monotonic()
    load_start = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load_start[0]:.2f} "
          "(other work running here skews every number)", flush=True)
    hosted_port = free_port()
    hosted = kids.start("hosted", [
        sys.executable, str(ROOT / "scripts/benchlib/mockup.py"), "--port", str(hosted_port),
        "--ttft-s", "0.3", "--ttft-jitter-s", "0.2", "--tok-per-s", "50",
        "--seed", str(args.seed)])
    hosted_url = f"http://{HOST}:{hosted_port}"
    await asyncio.to_thread(wait_http, hosted_url + "/health", 30, hosted, "hosted")
    if args.engine_url:
        engine_url = args.engine_url.rstrip("/")
    else:
        print("starting the demo engine (about a minute)...", flush=True)
        engine_url = await engine.start(args.engine_timeout, cpus=args.engine_cpus)
    timings = {"engine_start_s": time.monotonic() - t_start}
    await engine_idle(engine_url, 60)
    engine_port = int(engine_url.rsplit(":", 1)[1].split("/")[0])
    warm = Pool(HOST, engine_port)
    for _ in range(3):
        await warm.post(PATH, request_body(args.max_tokens))
    warm.close()
    # The interactive request alone, one every 0.5 s straight to the engine: the TTFT the
    # SLO (--slo-s, absolute) is measured against, for context.
    alone, _ = await replay(engine_port, [0.5 * i for i in range(8)],
                            request_body(args.max_tokens), args.timeout)
    unloaded = {"ttft_p50_s": pct([r.ttft for r in alone], 50),
                "ttft_max_s": max(r.ttft for r in alone)}
    print(f"unloaded TTFT p50 {unloaded['ttft_p50_s']:.3f} s (SLO {args.slo_s:g} s)",
          flush=True)
    t = time.monotonic()
    inflight_at_cap: float | None = None
    if args.capacity:
        cap = args.capacity
    else:
        print(f"local capacity at p95 TTFT <= {args.slo_s:g} s (straight to the engine):",
              flush=True)
        found = await capacity(engine_port, engine_url, args)
        cap = float(found["capacity_rps"])
        inflight_at_cap = found.get("inflight_p95_at_capacity")
    if args.max_inflight is None:
        # The router's cap is the engine's: the requests in flight it sustained at its
        # capacity within the SLO (6 when the capacity was given), halved until the engine
        # held at that many keeps the SLO (bench_offload's rule, without its bisection).
        args.max_inflight = max(1, math.ceil(inflight_at_cap)) if inflight_at_cap else 6
    closed = await closed_capacity(engine_port, engine_url, args.max_inflight, args)
    while not closed["ok"] and args.max_inflight > 1:
        args.max_inflight //= 2
        closed = await closed_capacity(engine_port, engine_url, args.max_inflight, args)
    # The batch is sized on this throughput, and one sample of it varies from run to run
    # on this machine (README): a high one makes a batch local capacity cannot almost
    # meet, a low one an easy one. The median of --closed-samples.
    samples = [closed] + [await closed_capacity(engine_port, engine_url, args.max_inflight,
                                                args)
                          for _ in range(args.closed_samples - 1)]
    closed = dict(sorted(samples, key=lambda r: float(r["rps"]))[len(samples) // 2])
    closed["samples_rps"] = [r["rps"] for r in samples]
    if args.naive_concurrency is None:
        args.naive_concurrency = max(16, 2 * args.max_inflight)
    timings["capacity_s"] = time.monotonic() - t
    # The router holds the engine at max_inflight: the local path serves at most the
    # closed-loop throughput, whatever the open-loop capacity says (noisy, and above it
    # when the engine batches more than max_inflight).
    rate = args.load * min(cap, float(closed["rps"]))
    trace = make_trace(rate, args.burst, args.window_s, args.seed)
    interactive_per_s = len(trace.arrivals) / args.window_s
    left_over = max(0.1, float(closed["rps"]) - interactive_per_s)
    n = args.lines or max(10, round(left_over * args.window_s * args.fill))
    print(f"capacity {cap:.2f} req/s (SLO), {closed['rps']:.2f} req/s with "
          f"{args.max_inflight} in flight (the median of "
          f"{', '.join(f'{x:.1f}' for x in closed['samples_rps'])}); "
          f"interactive {interactive_per_s:.2f} req/s "
          f"(burst x{args.burst:g}); batch of {n} lines in a {args.window_s:.0f} s window "
          f"(the left-over {left_over:.2f} req/s serves about {100 / args.fill:.0f}%)",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    baseline: dict[str, Any] | None = None
    if args.baseline:
        t = time.monotonic()
        print("phase interactive-alone (the trace without a batch)...", flush=True)
        baseline = await run_alone(kids, engine_url, hosted_url, trace, args, tmp)
        timings["interactive-alone_s"] = time.monotonic() - t
    for name in PHASES:
        t = time.monotonic()
        print(f"phase {name}...", flush=True)
        results[name] = await run_phase(name, kids, engine_url, hosted_url, trace, n, args,
                                        tmp)
        timings[f"{name}_s"] = time.monotonic() - t
    a, b = results[PHASES[0]], results[PHASES[1]]
    rows = []
    if baseline is not None:
        i = baseline["interactive"]
        rows.append(["interactive alone", i["n"], i["ttft_p50_s"], i["ttft_p95_s"],
                     f"{100 * i['in_slo']:.1f}%", i["hosted"], "-", "-", "-", "-", "-", "-",
                     "-"])
    for name in PHASES:
        r = results[name]
        i = r["interactive"]
        rows.append([name, i["n"], i["ttft_p50_s"], i["ttft_p95_s"], f"{100 * i['in_slo']:.1f}%",
                     i["hosted"], r["batch_ok"], r["batch_local"], r["batch_hosted"],
                     f"{r['batch_hosted_cost_usd']:.6f}", f"{r['batch_end_s']:.0f}",
                     "yes" if r["deadline_met"] else "no",
                     f"{100 * r['engine_busy_while_batch_pending']:.0f}%"])
    # "spilled": interactive requests sent hosted (routing's saturation limits); more than
    # the trace alone's means the batch pushed interactive traffic off the engine.
    print(table(["phase", "interactive", "TTFT p50", "p95", "in SLO", "spilled", "batch ok",
                 "local", "hosted", "batch hosted $", "batch end s", "deadline",
                 "engine busy"], rows))
    cost_a = a["batch_hosted_cost_usd"]
    targets = {
        "b_interactive_in_slo_ge_99pct": b["interactive"]["in_slo"] >= 0.99,
        "b_batch_by_deadline": bool(b["deadline_met"]),
        "b_hosted_cost_le_25pct_of_a": (b["batch_hosted_cost_usd"] <= 0.25 * cost_a
                                        if cost_a > 0 else b["batch_hosted_cost_usd"] == 0),
        "b_engine_busy_ge_90pct_while_pending":
            b["engine_busy_while_batch_pending"] >= 0.9,
    }
    # The issue's admission rule, "batch never makes an interactive request spill that
    # would otherwise have run locally", read off the whole trace: (b)'s interactive
    # requests sent hosted against the trace alone's (the same arrivals).
    spilled = {"alone": baseline["interactive"]["hosted"] if baseline is not None else None,
               **{name: results[name]["interactive"]["hosted"] for name in PHASES}}
    print(f"interactive requests sent hosted: {spilled}", flush=True)
    # The trace alone is the ceiling this machine gives the SLO: (b) against it.
    b_vs_alone = (b["interactive"]["in_slo"] / baseline["interactive"]["in_slo"]
                  if baseline is not None and baseline["interactive"]["in_slo"] > 0 else None)
    if b_vs_alone is not None:
        print(f"(b) in SLO: {100 * b_vs_alone:.1f}% of the trace alone's share", flush=True)
    plot(args.plot, results, trace, args)
    print(f"plot written to {args.plot}", file=sys.stderr)
    return {
        "bench": "batch", "quick": bool(args.quick), "split_cpus": bool(args.split_cpus),
        "slo_ttft_s": args.slo_s,
        "max_tokens": args.max_tokens,
        "capacity_rps": cap, "closed_loop": closed, "unloaded_ttft": unloaded,
        "router": router_config("x", "engine", "hosted", args, tmp)["aliases"][ALIAS],
        "batches_config": router_config("x", "engine", "hosted", args, tmp)["batches"],
        "trace": {"requests": len(trace.arrivals), "window_s": args.window_s,
                  "segments": trace.segments},
        "batch_lines": n, "naive_concurrency": args.naive_concurrency,
        "hosted_fake": {"ttft_s": [0.3, 0.5], "tok_per_s": 50.0},
        "b_cost_vs_a": b["batch_hosted_cost_usd"] / cost_a if cost_a > 0 else None,
        "b_in_slo_vs_alone": b_vs_alone,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "results": results, "interactive_alone": baseline, "targets_met": targets,
        "interactive_spilled": spilled,
        "timings_s": timings,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a 100 s window (a smaller batch) and 10 s capacity steps")
    p.add_argument("--engine-url", help="use this running engine (its /v1 URL); it must run "
                   "with --scheduling-policy priority and serve the demo model as 'demo'")
    p.add_argument("--engine-timeout", type=float, default=900)
    p.add_argument("--slo-s", type=float, default=1.0, help="interactive TTFT SLO")
    p.add_argument("--max-tokens", type=int, default=64, help="for both kinds of request")
    p.add_argument("--capacity", type=float, help="skip the capacity run, use this req/s")
    p.add_argument("--start-rate", type=float, default=1.0)
    p.add_argument("--max-rate", type=float, default=32.0)
    p.add_argument("--step-s", type=float, help="seconds per capacity step (15; --quick 10)")
    p.add_argument("--refine-steps", type=int, help="bisection steps (1; --quick 0)")
    p.add_argument("--load", type=float, default=0.6,
                   help="interactive rate as a share of the local capacity (the lower of the "
                   "open-loop capacity at the SLO and the max_inflight throughput)")
    p.add_argument("--burst", type=float, default=2.0,
                   help="the burst's rate as a multiple of the interactive rate")
    p.add_argument("--window-s", type=float,
                   help="the interactive trace and the batch's completion_window (180 s; "
                   "--quick 100 s)")
    p.add_argument("--fill", type=float, default=1.15,
                   help="batch lines = fill x what the left-over local throughput serves "
                   "in the window")
    p.add_argument("--lines", type=int, help="the batch's size (default: from --fill)")
    p.add_argument("--closed-samples", type=int, default=3,
                   help="closed-loop throughput samples at max_inflight; the batch is sized "
                   "on their median")
    p.add_argument("--baseline", action="store_true",
                   help="first replay the interactive trace alone (no batch): the machine's "
                   "own share inside the SLO, the reference for (a) and (b)")
    p.add_argument("--naive-concurrency", type=int,
                   help="(a): batch requests under way at once (default: twice max_inflight, "
                   "at least 16: a client that wants its batch done pushes past the "
                   "engine, and latency-first spills what it cannot take at full price)")
    p.add_argument("--max-inflight", type=int,
                   help="saturation.max_inflight (default: the engine's in-flight count at "
                   "its capacity, halved until it keeps the SLO; 6 with --capacity)")
    p.add_argument("--batch-below", type=float,
                   help="saturation.batch_below (default: the router's)")
    p.add_argument("--local-concurrency", type=int,
                   help="batches.local_concurrency (default: the router's)")
    p.add_argument("--hosted-concurrency", type=int,
                   help="batches.hosted_concurrency (default: the router's)")
    p.add_argument("--deadline-margin", type=float,
                   help="batches.deadline_margin (default: the router's)")
    p.add_argument("--price-in", type=float, default=0.10, help="USD per million tokens")
    p.add_argument("--price-out", type=float, default=0.30, help="USD per million tokens")
    p.add_argument("--batch-discount", type=float, default=0.5,
                   help="batch_price as a share of the price (La Plateforme: 50%%)")
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--plot", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--publish", action="store_true",
                   help="write docs/batch.json and docs/batch.png, the files the README quotes")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--split-cpus", action="store_true",
                   help="pin the engine to the last CPU and everything else (routers, the "
                   "fake hosted API, the load) to the others, as on a GPU host where "
                   "relaying hosted calls does not take the model's cores")
    args = p.parse_args()
    args.engine_cpus = split_cpus(p) if args.split_cpus else None
    scratch = Path(tempfile.gettempdir())
    if args.plot is None:
        args.plot = ROOT / "docs" / "batch.png" if args.publish else scratch / "batch.png"
    if args.out is None:
        args.out = (ROOT / "docs" / "batch.json" if args.publish
                    else scratch / "spillover-bench-batch.json")
    # --quick changes the defaults only: values given on the command line stand.
    for name, full, quick in (("step_s", 15.0, 10.0), ("window_s", 180.0, 100.0),
                              ("refine_steps", 1, 0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return run_on_engine("spillover-batch-", args.keep_logs, args.out,
                         lambda kids, engine, tmp: run(args, kids, engine, tmp))


if __name__ == "__main__":
    raise SystemExit(main())
