#!/usr/bin/env python3
"""What spillover adds on the hot path: latency, throughput, streaming, open streams.

    .venv/bin/python scripts/bench_overhead.py            # full run (run times:
    .venv/bin/python scripts/bench_overhead.py --quick    # docs/performance.md)
    .venv/bin/python scripts/bench_overhead.py --profile 15   # + py-spy on the router
                                                          # (.venv/bin/pip install py-spy)

Starts a minimal OpenAI-compatible upstream (scripts/benchlib/mockup.py, answering like an
idle vLLM engine) and `spillover serve --no-engines` in front of it, then measures, each
time straight to the upstream, through a bare pass-through proxy (scripts/benchlib/
bareproxy.py: spillover's server, engine client and stream writer with nothing between,
the cost of one more process hop with this stack) and through the router, in the same
run:

- open loop at fixed rates (requests sent on schedule whatever the answers; latency from
  the scheduled send time): p50 / p99 and what the router adds;
- closed loop: the most requests/s, with one router worker and (through uvicorn's
  --factory, since `spillover serve` has no --workers) with several;
- streams: time to first token and the lateness of every later chunk;
- many streams held open at once, and the router's RSS while they run;
- a closed loop again on the routers that just took the overload and the open streams
  (what their state left behind costs);
- a tiered alias next to the plain one it puts everyday requests on (`--tiers-only` runs
  just this): what scoring and deciding the tier adds to the p50;
- OpenTelemetry: the same router with tracing off (no OTEL_* variables) and on (every span
  exported over OTLP/HTTP to a local sink), in interleaved rounds (`--otel-only` runs just
  this): what tracing adds to the p50/p99 and the router's CPU per request; with
  `--otel-baseline`, also the router built without the tracing hooks (HEAD with them
  compiled out in a temporary git worktree, or a given commit): what the router adds over
  the upstream and its CPU per request with the hooks (tracing off) and without, and the
  ratio;
- slow readers: callers holding long streams open and reading a trickle, beside ordinary
  requests on another alias: the router's CPU per relayed MB and those requests' p50/p99.

Each phase gets a fresh router. This process is the load generator (raw asyncio streams,
uvloop, keep-alive pool); it prints its own CPU use per request so you can see it is not
the bottleneck. Numbers on a shared 2-core machine are noisy: compare the columns of one
run, not runs with each other.

Prints tables and, last, one JSON line with every figure, also written to a temporary
file, or to --out, or with --publish to docs/overhead.json (what the README quotes): a run
leaves the repository as it was unless asked.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.httpload import Conn, Pool, now, on_schedule
from benchlib.meter import CpuMeter
from benchlib.procs import ROOT, VENV_BIN, Children, free_port, sigterm_as_exit, wait_http
from benchlib.stats import emit, ms, pct, table

HOST = "127.0.0.1"
PUBLISHED = ROOT / "docs" / "overhead.json"
PATH = "/v1/chat/completions"
ALIAS = "bench"
SLOW_ALIAS = "bench-slow"
# A tiered alias over ALIAS (everyday) and TOP_ALIAS, both on the same mock upstream: the
# bench prompt scores far below the threshold, so a request to TIERED reaches the same
# engine as one to ALIAS and the difference is what deciding the tier costs.
TOP_ALIAS = "bench-top"
TIERED = "bench-auto"
BENCH_KEY = b"sk-spill-bench"
AUTH = b"authorization: Bearer " + BENCH_KEY + b"\r\n"
PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Say hello in three languages, briefly please."}]


@dataclass(frozen=True)
class Target:
    name: str  # "direct" | "router" | "router-xN"
    port: int
    pid: int


def body(stream: bool = False, mock: dict[str, Any] | None = None,
         model: str = ALIAS) -> bytes:
    b: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": 16,
                         "temperature": 0.7}
    if stream:
        b["stream"] = True
    if mock:
        b["mock"] = mock
    return orjson.dumps(b)


# --- measurements ---------------------------------------------------------------------


async def open_loop(t: Target, rate: float, duration: float, warmup: float,
                    payload: bytes) -> dict[str, Any]:
    pool = Pool(HOST, t.port)
    await pool.warm(16)
    lat: list[float] = []
    errors = collections.Counter[str]()
    n_warm = int(warmup * rate)
    n_total = n_warm + int(duration * rate)
    tasks: set[asyncio.Task[None]] = set()
    late: list[float] = []

    async def one(scheduled: float, record: bool) -> None:
        try:
            r = await pool.post(PATH, payload)
        except Exception as exc:
            errors[type(exc).__name__] += 1
            return
        if r.status != 200:
            errors[str(r.status)] += 1
        elif record:
            lat.append(now() - scheduled)

    async for i, scheduled, behind in on_schedule(rate, n_total):
        if behind is not None and i >= n_warm:
            late.append(behind)
        task = asyncio.create_task(one(scheduled, i >= n_warm))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    for task in list(tasks):  # still unanswered after 30 s: count them, stop waiting
        task.cancel()
        errors["unanswered after 30 s"] += 1
    pool.close()
    return {"rate": rate, "n": len(lat), "p50_ms": ms(pct(lat, 50)), "p90_ms": ms(pct(lat, 90)),
            "p99_ms": ms(pct(lat, 99)), "max_ms": ms(max(lat, default=float("nan"))),
            "errors": dict(errors), "connections": pool.opened,
            "send_late_p99_ms": ms(pct(late, 99)) if late else 0.0}


async def closed_loop(t: Target, concurrency: int, duration: float, warmup: float,
                      payload: bytes | None) -> dict[str, Any]:
    """payload None: GET /healthz (the server and framework alone, no upstream call)."""
    conns = [await Conn.open(HOST, t.port) for _ in range(concurrency)]
    lat: list[float] = []
    errors = 0
    measuring = False
    stop_at = now() + warmup + duration

    async def worker(conn: Conn) -> None:
        nonlocal errors
        while now() < stop_at:
            t0 = now()
            r = await (conn.get("/healthz") if payload is None else conn.post(PATH, payload))
            if r.status != 200:
                errors += 1
            elif measuring:
                lat.append(now() - t0)

    tasks = [asyncio.create_task(worker(c)) for c in conns]
    await asyncio.sleep(warmup)
    measuring = True
    n0, t_start = len(lat), now()
    await asyncio.gather(*tasks)
    elapsed = now() - t_start
    for c in conns:
        c.close()
    n = len(lat) - n0
    return {"concurrency": concurrency, "rps": round(n / elapsed, 1), "n": n,
            "p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99)), "errors": errors}


async def streams(t: Target, rate: float, duration: float, tokens: int,
                  interval: float) -> dict[str, Any]:
    """Open-loop streams; TTFT and each later chunk's lateness against its schedule.
    The samples themselves are returned too (`samples`), for pooling across rounds."""
    pool = Pool(HOST, t.port)
    await pool.warm(8)
    payload = body(stream=True, mock={"tokens": tokens, "interval_s": interval, "ttft_s": 0})
    ttft: list[float] = []
    chunk_lag: list[float] = []
    gaps: list[float] = []
    errors = 0
    bad_count = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        nonlocal errors, bad_count
        try:
            r = await pool.post(PATH, payload)
        except Exception:
            errors += 1
            return
        ev = r.event_times
        if r.status != 200 or not ev:
            errors += 1
            return
        if len(ev) != tokens + 1:  # every token and the finish chunk
            bad_count += 1
        ttft.append(ev[0] - scheduled)
        for i in range(1, min(tokens, len(ev))):
            chunk_lag.append(ev[i] - scheduled - i * interval)
            gaps.append(ev[i] - ev[i - 1])

    async for _, scheduled, _ in on_schedule(rate, int(duration * rate)):
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    pool.close()
    return stream_stats({"rate": rate, "errors": errors, "wrong_chunk_count": bad_count,
                         "samples": {"ttft": ttft, "chunk_lag": chunk_lag, "gaps": gaps}})


def stream_stats(r: dict[str, Any]) -> dict[str, Any]:
    s = r["samples"]
    return {**r, "n": len(s["ttft"]),
            "ttft_p50_ms": ms(pct(s["ttft"], 50)), "ttft_p99_ms": ms(pct(s["ttft"], 99)),
            "chunk_lag_p50_ms": ms(pct(s["chunk_lag"], 50)),
            "chunk_lag_p99_ms": ms(pct(s["chunk_lag"], 99)),
            "gap_p50_ms": ms(pct(s["gaps"], 50)), "gap_p99_ms": ms(pct(s["gaps"], 99))}


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds against one target: samples and counts summed."""
    samples = {k: [x for r in rounds for x in r["samples"][k]] for k in rounds[0]["samples"]}
    return stream_stats({"rate": rounds[0]["rate"], "rounds": len(rounds),
                         "errors": sum(r["errors"] for r in rounds),
                         "wrong_chunk_count": sum(r["wrong_chunk_count"] for r in rounds),
                         "samples": samples})


async def many_streams(t: Target, n: int, tokens: int, interval: float,
                       ramp_s: float) -> dict[str, Any]:
    """n streams open at once (each `tokens` chunks `interval` apart); the RSS of t.pid."""
    proc = psutil.Process(t.pid)
    family = [proc, *proc.children(recursive=True)]

    def rss() -> int:
        total = 0
        for p in family:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    rss_before = rss()
    payload = body(stream=True, mock={"tokens": tokens, "interval_s": interval, "ttft_s": 0})
    live = 0
    peak_live = 0
    peak_rss = rss_before
    rss_at_peak_live = rss_before
    lags: list[float] = []
    counts = collections.Counter[str]()
    done = asyncio.Event()

    async def one() -> None:
        nonlocal live, peak_live
        conn: Conn | None = None
        started = False
        try:
            conn = await Conn.open(HOST, t.port)
            t0 = now()

            def on_event(at: float) -> None:
                nonlocal live, peak_live, started
                if not started:
                    started = True
                    live += 1
                    peak_live = max(peak_live, live)

            r = await conn.post(PATH, payload, on_event=on_event)
            ev = r.event_times
            if r.status != 200:
                counts[f"status {r.status}"] += 1
            elif len(ev) != tokens + 1:
                counts["short"] += 1
            else:
                counts["ok"] += 1
                lags.extend(e - ev[0] - i * interval for i, e in enumerate(ev[:tokens]))
            _ = t0
        except Exception as exc:
            counts[type(exc).__name__] += 1
        finally:
            if started:
                live -= 1
            if conn is not None:
                conn.close()

    async def sampler() -> None:
        nonlocal peak_rss, rss_at_peak_live
        while not done.is_set():
            r = rss()
            peak_rss = max(peak_rss, r)
            if live >= peak_live:
                rss_at_peak_live = max(rss_at_peak_live, r)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.1)

    sampling = asyncio.create_task(sampler())
    tasks = []
    batch = max(1, n // 20)
    t_start = now()
    for i in range(0, n, batch):
        tasks += [asyncio.create_task(one()) for _ in range(min(batch, n - i))]
        await asyncio.sleep(ramp_s / 20)
    await asyncio.wait(tasks, timeout=tokens * interval + 60)
    wall = now() - t_start
    done.set()
    await sampling
    await asyncio.sleep(1.0)
    rss_after = rss()
    return {"streams": n, "peak_open": peak_live, "outcomes": dict(counts),
            "wall_s": round(wall, 2),
            "chunk_lag_p50_ms": ms(pct(lags, 50)), "chunk_lag_p99_ms": ms(pct(lags, 99)),
            "rss_before_mb": round(rss_before / 2**20, 1),
            "rss_peak_mb": round(peak_rss / 2**20, 1),
            "rss_after_mb": round(rss_after / 2**20, 1),
            "kb_per_open_stream": round((rss_at_peak_live - rss_before) / 1024
                                        / max(1, peak_live), 1)}


# --- processes ------------------------------------------------------------------------


async def slow_readers(t: Target, n: int, duration: float, rate: float, read_bytes: int,
                       read_every_s: float, rcvbuf: int, fill_s: float) -> dict[str, Any]:
    """n callers each holding a long stream open (~13 MB from the upstream, back to back)
    and reading `read_bytes` every `read_every_s` through a small receive buffer, while
    ordinary requests go to the router at `rate` on another alias; the router's CPU per MB
    it relayed to the slow readers, and the ordinary requests' latency beside them."""
    payload = orjson.dumps({"model": SLOW_ALIAS, "messages": PROMPT, "stream": True,
                            "mock": {"tokens": 100_000, "interval_s": 0, "ttft_s": 0}})
    got = [0] * n
    heads: list[bytes] = []
    stop = asyncio.Event()

    async def reader(i: int) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, t.port))
        r, w = await asyncio.open_connection(sock=sock, limit=1 << 16)
        w.write(b"POST %s HTTP/1.1\r\nhost: x\r\n%scontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (PATH.encode(), AUTH, len(payload),
                                                     payload))
        try:
            heads.append((await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 60))[:12])
            while not stop.is_set():
                data = await r.read(read_bytes)
                if not data:
                    return
                got[i] += len(data)
                await asyncio.sleep(read_every_s)
        finally:
            w.close()

    cpu_t = CpuMeter({"target": t.pid})
    # The ordinary load alone first, for comparison, then beside the slow readers.
    cpu_t.start()
    t0 = now()
    alone = await open_loop(t, rate, duration, 1.0, body())
    alone["router_cpu_share"] = round(cpu_t.stop()["target"] / (now() - t0), 3)
    tasks = [asyncio.create_task(reader(i)) for i in range(n)]
    await asyncio.sleep(fill_s)  # the buffers on the way fill; the upstream is far ahead
    relayed0 = sum(got)
    cpu_t.start()
    t0 = now()
    beside = await open_loop(t, rate, duration, 1.0, body())
    wall = now() - t0
    cpu = cpu_t.stop()["target"]
    relayed_mb = (sum(got) - relayed0) / 1e6
    beside["router_cpu_share"] = round(cpu / wall, 3)
    stop.set()
    await asyncio.wait(tasks, timeout=10)
    errors = [type(x.exception()).__name__ for x in tasks
              if x.done() and not x.cancelled() and x.exception() is not None]
    return {
        "slow_readers": n, "read": f"{read_bytes} B every {read_every_s * 1000:g} ms",
        "rcvbuf": rcvbuf, "heads": dict(collections.Counter(h.decode() for h in heads)),
        "reader_errors": dict(collections.Counter(errors)),
        "relayed_mb": round(relayed_mb, 2),
        "router_cpu_s": round(cpu, 2),
        "router_cpu_ms_per_relayed_mb": (round(cpu / relayed_mb * 1e3, 1)
                                         if relayed_mb > 0 else None),
        # Less what the ordinary requests cost alone: the slow readers' own share.
        "router_extra_cpu_ms_per_relayed_mb": (
            round((cpu - alone["router_cpu_share"] * wall) / relayed_mb * 1e3, 1)
            if relayed_mb > 0 else None),
        "ordinary_alone": alone, "ordinary_beside": beside,
    }


def write_config(path: Path, upstream_port: int, max_connections: int,
                 slow_port: int) -> None:
    from router.config import Server

    server: dict[str, Any] = {"max_connections": max_connections, "request_timeout_s": 120,
                              "metrics_interval_s": 0.5}
    if "ledger_path" in Server.model_fields:
        # Not the repository's .spillover/ledger.db: a benchmark's rows are not real calls.
        server["ledger_path"] = str(path.parent / "ledger.db")
    cfg = {
        "server": server,
        # One caller with no stream cap: the open-streams phase holds 1,000 at once, more
        # than the default policy's max_concurrent_streams.
        "callers": {"bench": {"key_sha256": [hashlib.sha256(BENCH_KEY).hexdigest()],
                              "max_concurrent_streams": None}},
        "aliases": {ALIAS: {"local": [{
            "name": "bench-local", "model": ALIAS, "license": "apache-2.0",
            "base_url": f"http://{HOST}:{upstream_port}/v1",
            "saturation": {"max_inflight": 100000, "max_waiting": 1000000,
                           "max_kv_cache": 1.0},
        }]}, SLOW_ALIAS: {"local": [{
            # The slow readers' alias, on an upstream of its own: what generating their
            # streams costs must not fall on the ordinary requests (to ALIAS) that phase
            # measures beside them; only the router is shared.
            "name": "bench-slow", "model": SLOW_ALIAS, "license": "apache-2.0",
            "base_url": f"http://{HOST}:{slow_port}/v1",
            "saturation": {"max_inflight": 100000, "max_waiting": 1000000,
                           "max_kv_cache": 1.0},
        }]}, TOP_ALIAS: {"local": [{
            "name": "bench-top", "model": TOP_ALIAS, "license": "apache-2.0",
            "base_url": f"http://{HOST}:{upstream_port}/v1",
            "saturation": {"max_inflight": 100000, "max_waiting": 1000000,
                           "max_kv_cache": 1.0},
        }]}, TIERED: {"tiers": [ALIAS, TOP_ALIAS], "thresholds": [0.9]}},
    }
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML


def cli_has_workers() -> bool:
    out = subprocess.run([str(VENV_BIN / "spillover"), "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    return "--workers" in out


def start_router(kids: Children, name: str, config: Path, workers: int = 1,
                 via: str = "cli", env: dict[str, str] | None = None,
                 tree: Path | None = None) -> Target:
    """`spillover serve` (via "cli"), or uvicorn with the app factory (via "uvicorn"):
    uvicorn's own runner picks uvloop and can fork workers. `tree`: `spillover serve` of
    the router package in that checkout (a git worktree), with this venv's packages."""
    port = free_port()
    serve = [str(VENV_BIN / "spillover"), "serve", "--no-engines", "--config", str(config),
             "--port", str(port), "--log-level", "warning"]
    if tree is not None:
        # The checkout's own package first on the path: the editable install's finder
        # comes after sys.path (checked by tree_imports).
        serve[:1] = [sys.executable, "-m", "router.cli"]
        env = {**(env or {}), "PYTHONPATH": str(tree)}
    if via == "cli" and workers > 1 and not cli_has_workers():
        via = "uvicorn"
    if via == "cli":
        argv = serve + (["--workers", str(workers)] if workers > 1 else [])
    else:
        argv = [sys.executable, "-m", "uvicorn", "benchlib.routerapp:app", "--factory",
                "--app-dir", str(ROOT / "scripts"), "--host", HOST, "--port", str(port),
                "--workers", str(workers), "--log-level", "warning", "--no-access-log",
                "--timeout-graceful-shutdown", "5"]
    proc = kids.start(name, argv, env={"SPILLOVER_CONFIG": str(config), **(env or {})},
                      cwd=tree or ROOT)
    try:
        wait_http(f"http://{HOST}:{port}/readyz", 60, proc, name)
    except RuntimeError:
        print(kids.log_tail(name), file=sys.stderr)
        raise
    if workers > 1:
        time.sleep(1.5)  # every worker's monitor has probed the engine
    return Target(name, port, proc.pid)


# --- a build without the tracing hooks ---------------------------------------------

# Each tracing hook on the request path is one `if <x>.trace is not None ...:` or
# `if <x>.tracing is not None:` statement (router/routing/tracing.py). `if False:` is
# dropped by CPython's compiler, body and test alike: the stripped build runs the same
# code as HEAD with no hook at all.
_HOOK = re.compile(r"^(?P<indent>[ \t]*)if [\w.]+\.(?:trace|tracing) is not None"
                   r"(?: and [^:\n]+)?:", re.M)


def add_worktree(tmp: Path, name: str, ref: str) -> Path:
    path = tmp / name
    subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    return path


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT,
                   capture_output=True, timeout=120)


def strip_hooks(tree: Path) -> int:
    """Compile every tracing hook of the router in `tree` out; how many there were."""
    count = 0
    for path in sorted((tree / "router").rglob("*.py")):
        text = path.read_text()
        new, n = _HOOK.subn(lambda m: m.group("indent") + "if False:", text)
        if n:
            path.write_text(new)
            count += n
    left = [str(p.relative_to(tree)) for p in (tree / "router").rglob("*.py")
            if re.search(r"\.(?:trace|tracing) is not None", p.read_text())
            and p.name != "runtime.py"]  # the Runtime's start/stop, off the request path
    if left or not count:
        raise RuntimeError(f"tracing hooks not stripped ({count} found; left in {left})")
    return count


def baseline_trees(tmp: Path, baseline: str, trees: list[Path]
                   ) -> tuple[Path, Path, str, str]:
    """HEAD's worktree and the baseline's (`trees` lists them for removal), HEAD's short
    commit and what the baseline is."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                            capture_output=True, text=True, timeout=30).stdout.strip()
    head = add_worktree(tmp, "head", "HEAD")
    trees.append(head)
    base = add_worktree(tmp, "without-hooks", "HEAD" if baseline == "stripped" else baseline)
    trees.append(base)
    if baseline == "stripped":
        what = f"HEAD {commit} with its {strip_hooks(base)} tracing hooks compiled out"
    else:
        what = f"commit {baseline}"
    for tree in (head, base):
        tree_imports(tree)
    return head, base, commit, what


def tree_imports(tree: Path) -> str:
    """Where `router` is imported from with the tree's PYTHONPATH (the tree, or fail)."""
    out = subprocess.run([sys.executable, "-c", "import router; print(router.__file__)"],
                         cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the router in {tree} imports {out}, not its own")
    return out


# --- profile --------------------------------------------------------------------------


_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")


def _short(path: str) -> str:
    for marker in ("/site-packages/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _module(path: str) -> str:
    """router/x.py as is; a library by its package; the standard library by its module."""
    short = _short(path)
    if short.startswith(("router/", "serving/")) or "/" not in short:
        return short
    if short != path:
        return short.split("/")[0]
    return "/".join(Path(path).parts[-2:]) if "asyncio" in path else Path(path).name


_CLIENT = frozenset({"httpx", "httpcore", "anyio", "h11", "sniffio"})
_SERVER = frozenset({"uvicorn", "starlette", "fastapi"})


def _layer(path: str) -> str:
    """Which layer a frame's file belongs to: the upstream HTTP client, the server and
    framework, the event loop, the router's own modules (by file), or other."""
    short = _short(path)
    top = short.split("/")[0]
    if top in _CLIENT:
        return "upstream client (httpx/httpcore/anyio/h11)"
    if top in _SERVER:
        return "server (uvicorn/starlette/fastapi)"
    if top in ("router", "serving"):
        return short
    if "asyncio" in path or "selector" in path or Path(path).name == "socket.py":
        return "event loop and socket calls (asyncio)"
    return f"other ({Path(short).name if '/' not in short else top})"


def summarise_profile(raw: Path, top: int) -> dict[str, Any]:
    """Self and inclusive sample shares per frame (and inclusive per file) from py-spy's
    collapsed-stack output."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    file_n: collections.Counter[str] = collections.Counter()
    self_mod: collections.Counter[str] = collections.Counter()
    self_layer: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = []
        for f in stack.split(";"):
            m = _FRAME.match(f)
            frames.append(f"{m['fn']} ({_short(m['file'])}:{m['line']})" if m else f)
        self_n[frames[-1]] += n
        leaf = _FRAME.match(stack.rsplit(";", 1)[-1])
        self_mod[_module(leaf["file"]) if leaf else "?"] += n
        self_layer[_layer(leaf["file"]) if leaf else "?"] += n
        for f in set(frames):
            incl_n[f] += n
        for f in {_module(m["file"]) for m in map(_FRAME.match, stack.split(";")) if m}:
            file_n[f] += n

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / max(1, total), 1)) for k, v in c.most_common(top)]

    return {"samples": total, "self": share(self_n), "inclusive": share(incl_n),
            "self_by_layer": share(self_layer), "self_by_module": share(self_mod),
            "inclusive_by_module": share(file_n)}


async def profiled_load(t: Target, seconds: float, concurrency: int, out: Path,
                        rate: int, load_kind: str, args: argparse.Namespace) -> dict[str, Any]:
    spy = VENV_BIN / "py-spy"
    if not spy.exists():
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    proc = await asyncio.create_subprocess_exec(
        str(spy), "record", "--pid", str(t.pid), "--duration", str(int(seconds)),
        "--rate", str(rate), "--format", "raw", "--output", str(out), "--nonblocking",
        # Only samples holding the GIL: where Python time goes, not threads waiting for it.
        "--gil",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(0.5)
        if load_kind == "streams":
            load = await streams(t, args.stream_rate, seconds, args.stream_tokens,
                                 args.stream_interval)
            del load["samples"]
        else:
            load = await closed_loop(t, concurrency, seconds, 0.0, body())
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    return {"load": load, **await asyncio.to_thread(summarise_profile, out, 30)}


# --- main -----------------------------------------------------------------------------


async def run(args: argparse.Namespace, kids: Children, tmp: Path) -> dict[str, Any]:
    up_port = free_port()
    upstream = kids.start("upstream", [sys.executable,
                                       str(ROOT / "scripts/benchlib/mockup.py"),
                                       "--port", str(up_port)])
    await asyncio.to_thread(wait_http, f"http://{HOST}:{up_port}/health", 30, upstream,
                            "upstream")
    config = tmp / "models.yaml"
    slow_port = free_port()
    slow_up = kids.start("slow-upstream", [sys.executable,
                                           str(ROOT / "scripts/benchlib/mockup.py"),
                                           "--port", str(slow_port)])
    await asyncio.to_thread(wait_http, f"http://{HOST}:{slow_port}/health", 30, slow_up,
                            "slow-upstream")
    write_config(config, up_port, args.max_connections, slow_port)
    direct = Target("direct", up_port, upstream.pid)
    bare_port = free_port()
    bare_proc = kids.start("bare-proxy", [sys.executable,
                                          str(ROOT / "scripts/benchlib/bareproxy.py"),
                                          "--port", str(bare_port),
                                          "--upstream", f"http://{HOST}:{up_port}"])
    await asyncio.to_thread(wait_http, f"http://{HOST}:{bare_port}/health", 30, bare_proc,
                            "bare-proxy")
    # The floor: one more process hop with spillover's stack and no logic
    # (scripts/benchlib/bareproxy.py).
    bare = Target("bare-proxy", bare_port, bare_proc.pid)
    me = os.getpid()
    out: dict[str, Any] = {"bench": "overhead", "quick": args.quick,
                           "cpus": os.cpu_count(), "workers_flag": cli_has_workers()}
    payload = body()
    dur, warm = args.duration, min(2.0, args.duration / 3)
    current: list[str] = []

    async def fresh(name: str, workers: int = 1, via: str = "cli") -> Target:
        """Each phase gets a router of its own: an earlier phase's overload leaves state
        behind (idle upstream connections) that slows the next one down."""
        while current:
            kids.stop(current.pop())
        t = await asyncio.to_thread(start_router, kids, name, config, workers, via)
        current.append(name)
        return t

    async def slow_phase() -> None:
        # 5. Slow readers beside ordinary requests, on a fresh router.
        router = await fresh("router")
        await asyncio.sleep(1.0)
        r = await slow_readers(router, args.slow_readers, args.slow_duration,
                               args.slow_rate, 1024, 0.05, 32768, args.slow_fill)
        out["slow_readers"] = r
        a, b = r["ordinary_alone"], r["ordinary_beside"]
        print(f"\n{r['slow_readers']} slow readers ({r['read']}, receive buffer "
              f"{r['rcvbuf'] // 1024} KB) beside ordinary requests at {args.slow_rate:g}/s "
              "on another alias", flush=True)
        print(table(["ordinary requests", "n", "p50 ms", "p99 ms", "max ms", "errors",
                     "router cpu"],
                    [["alone", a["n"], a["p50_ms"], a["p99_ms"], a["max_ms"], a["errors"],
                      a["router_cpu_share"]],
                     ["beside slow readers", b["n"], b["p50_ms"], b["p99_ms"], b["max_ms"],
                      b["errors"], b["router_cpu_share"]]]))
        print(f"  relayed to the slow readers: {r['relayed_mb']} MB; router CPU "
              f"{r['router_cpu_ms_per_relayed_mb']} ms per relayed MB (all its work in the "
              f"window), {r['router_extra_cpu_ms_per_relayed_mb']} ms beyond the ordinary "
              f"requests' own; heads {r['heads']}, reader errors "
              f"{r['reader_errors']}")

    async def tier_phase() -> None:
        # The scorer's cost: the plain alias and the tiered one over it, on one router,
        # taking turns in short open-loop rounds (the host's drift falls on both alike).
        router = await fresh("router")
        tiered = body(model=TIERED)
        probe = Pool(HOST, router.port)
        r = await probe.post(PATH, tiered)
        probe.close()
        tier = r.headers.get(b"x-spillover-tier", b"").decode()
        if r.status != 200 or tier != ALIAS:
            raise RuntimeError(f"the tiered alias answered {r.status} on tier {tier!r}, "
                               f"not {ALIAS!r}: the phase would not compare like with like")
        rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "plain": [], "tiered": []}
        for _ in range(args.tier_rounds):
            for label, t, what in (("direct", direct, payload), ("plain", router, payload),
                                   ("tiered", router, tiered)):
                rounds[label].append(await open_loop(t, args.tier_rate, args.tier_duration,
                                                     1.0, what))
        res: dict[str, Any] = {"rate": args.tier_rate, "rounds": args.tier_rounds,
                               "seconds_per_round": args.tier_duration}
        rows = []
        for label, rs in rounds.items():
            p50s = sorted(x["p50_ms"] for x in rs)
            p99s = sorted(x["p99_ms"] for x in rs)
            res[label] = {"n": sum(x["n"] for x in rs), "p50_ms": p50s[len(p50s) // 2],
                          "p99_ms": p99s[len(p99s) // 2],
                          "errors": sum(sum(x["errors"].values()) for x in rs),
                          "round_p50_ms": [x["p50_ms"] for x in rs]}
            rows.append([label, res[label]["n"], res[label]["p50_ms"], res[label]["p99_ms"],
                         res[label]["errors"], res[label]["round_p50_ms"]])
        res["plain_added_p50_ms"] = round(res["plain"]["p50_ms"] - res["direct"]["p50_ms"], 3)
        res["tiered_added_p50_ms"] = round(
            res["tiered"]["p50_ms"] - res["direct"]["p50_ms"], 3)
        res["tier_decision_p50_ms"] = round(res["tiered"]["p50_ms"] - res["plain"]["p50_ms"],
                                            3)
        out["tiers"] = res
        print(f"\nTiered alias next to the plain one ({args.tier_rate:g} req/s open loop, "
              f"{args.tier_rounds} interleaved rounds of {args.tier_duration:g} s; median of "
              "the rounds' p50/p99, ms)", flush=True)
        print(table(["target", "n", "p50", "p99", "errors", "p50 per round"], rows))
        print(f"  added p50 over direct: plain alias {res['plain_added_p50_ms']:+.3f} ms, "
              f"tiered alias {res['tiered_added_p50_ms']:+.3f} ms; the tier decision "
              f"{res['tier_decision_p50_ms']:+.3f} ms")

    async def otel_phase() -> None:
        # Tracing's cost: routers on the same mock upstream, one with no OTEL_* variables
        # (no tracer: an is-None test per hook) and one exporting every span over
        # OTLP/HTTP (batched, protobuf) to a local sink, taking turns in open-loop rounds.
        # With --otel-baseline, beside them the same router without the hooks at all
        # (HEAD with them compiled out, or a commit before tracing), and the tracing-off
        # router from HEAD's own worktree: the two differ only by the hooks.
        while current:
            kids.stop(current.pop())
        trees: list[Path] = []
        try:
            await otel_rounds(trees)
        finally:
            for tree in trees:
                remove_worktree(tree)

    async def otel_rounds(trees: list[Path]) -> None:
        head_tree = base_tree = None
        res: dict[str, Any] = {"rate": args.otel_rate, "rounds": args.otel_rounds,
                               "seconds_per_round": args.otel_duration}
        if args.otel_baseline:
            head_tree, base_tree, res["head"], res["baseline"] = await asyncio.to_thread(
                baseline_trees, tmp, args.otel_baseline, trees)
        off = await asyncio.to_thread(start_router, kids, "router-otel-off", config, 1,
                                      "cli", None, head_tree)
        current.append(off.name)
        targets: list[tuple[str, Target]] = [("direct", direct)]
        if base_tree is not None:
            base = await asyncio.to_thread(start_router, kids, "router-no-hooks", config, 1,
                                           "cli", None, base_tree)
            current.append(base.name)
            targets.append(("without hooks", base))
            # The same build once more: how far two identical routers differ in this run
            # (the noise floor any ratio below is read against).
            again = await asyncio.to_thread(start_router, kids, "router-no-hooks-2", config,
                                            1, "cli", None, base_tree)
            current.append(again.name)
            targets.append(("without hooks, again", again))
        targets.append(("tracing off", off))
        on = await asyncio.to_thread(
            start_router, kids, "router-otel-on", config, 1, "cli",
            {"OTEL_TRACES_EXPORTER": "otlp",
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{HOST}:{up_port}/v1/traces",
             "OTEL_BSP_SCHEDULE_DELAY": "500"})
        current.append(on.name)
        targets.append(("tracing on", on))
        rounds: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in targets}
        meters = {label: 0.0 for label, _ in targets if label != "direct"}
        for i in range(args.otel_rounds):
            # Every other round in reverse order: a drift of the host falls on all alike.
            for label, t in (targets if i % 2 == 0 else targets[::-1]):
                meter = CpuMeter({"target": t.pid})
                meter.start()
                r = await open_loop(t, args.otel_rate, args.otel_duration, 1.0, payload)
                used = meter.stop()["target"]
                # CPU over the round's requests, its warm-up's included.
                r["cpu_us_per_req"] = used / max(1, int(args.otel_rate * (
                    args.otel_duration + 1.0))) * 1e6
                rounds[label].append(r)
                if label in meters:
                    meters[label] += used
                if label == "tracing on":
                    # Its batch exporter is still sending the round's spans (to the same
                    # mock upstream, on the same cores): let it finish before the next.
                    await asyncio.sleep(2.0)
        rows = []
        for label, rs in rounds.items():
            p50s = sorted(x["p50_ms"] for x in rs)
            p99s = sorted(x["p99_ms"] for x in rs)
            n = sum(x["n"] for x in rs)
            res[label] = {"n": n, "p50_ms": p50s[len(p50s) // 2],
                          "p99_ms": p99s[len(p99s) // 2],
                          "errors": sum(sum(x["errors"].values()) for x in rs),
                          "round_p50_ms": [x["p50_ms"] for x in rs]}
            if label in meters:
                res[label]["cpu_us_per_req"] = round(meters[label] / max(1, n) * 1e6)
            rows.append([label, n, res[label]["p50_ms"], res[label]["p99_ms"],
                         res[label]["errors"], res[label].get("cpu_us_per_req", ""),
                         res[label]["round_p50_ms"]])
        res["off_added_p50_ms"] = round(res["tracing off"]["p50_ms"] - res["direct"]["p50_ms"],
                                        3)
        res["tracing_added_p50_ms"] = round(
            res["tracing on"]["p50_ms"] - res["tracing off"]["p50_ms"], 3)
        res["tracing_added_p99_ms"] = round(
            res["tracing on"]["p99_ms"] - res["tracing off"]["p99_ms"], 3)
        res["tracing_added_cpu_us_per_req"] = (res["tracing on"]["cpu_us_per_req"]
                                               - res["tracing off"]["cpu_us_per_req"])
        out["otel"] = res
        print(f"\nOpenTelemetry off vs on ({args.otel_rate:g} req/s open loop, "
              f"{args.otel_rounds} interleaved rounds of {args.otel_duration:g} s; median of "
              "the rounds' p50/p99, ms; on: OTLP/HTTP export to a local sink)", flush=True)
        print(table(["target", "n", "p50", "p99", "errors", "router cpu us/req",
                     "p50 per round"], rows))
        print(f"  tracing on vs off: p50 {res['tracing_added_p50_ms']:+.3f} ms, p99 "
              f"{res['tracing_added_p99_ms']:+.3f} ms, router CPU "
              f"{res['tracing_added_cpu_us_per_req']:+d} us/req; off vs direct p50 "
              f"{res['off_added_p50_ms']:+.3f} ms")
        if "without hooks" not in res:
            return
        # What the router adds over the upstream alone (a round's p50/p99 less the direct
        # round's beside it), with the hooks (tracing off) and without them, and its CPU
        # per request: each a median over the rounds, and the median of the rounds'
        # ratios (paired: rounds next to each other in time). 1.0: no measurable cost;
        # the second router of the baseline build gives the ratio that noise alone makes.
        def med(xs: list[float]) -> float:
            xs = sorted(xs)
            n = len(xs)
            return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

        direct_r = rounds["direct"]

        def added(label: str, key: str) -> list[float]:
            return [x[key] - d[key] for x, d in zip(rounds[label], direct_r, strict=True)]

        def figures(label: str) -> dict[str, list[float]]:
            return {"added_p50_ms": added(label, "p50_ms"),
                    "added_p99_ms": added(label, "p99_ms"),
                    "cpu_us_per_req": [x["cpu_us_per_req"] for x in rounds[label]]}

        def ratio(num: list[float], den: list[float]) -> float | None:
            rs = [a / b for a, b in zip(num, den, strict=True) if b > 0]
            return round(med(rs), 3) if rs else None

        hooked, bare = figures("tracing off"), figures("without hooks")
        twin = figures("without hooks, again")
        cmp: dict[str, Any] = {}
        for key in ("added_p50_ms", "added_p99_ms", "cpu_us_per_req"):
            cmp[key] = {"hooks_off": round(med(hooked[key]), 3),
                        "without_hooks": round(med(bare[key]), 3),
                        "ratio": ratio(hooked[key], bare[key]),
                        "noise_ratio": ratio(twin[key], bare[key])}
        res["hooks_vs_without"] = cmp
        print(f"\nTracing off (HEAD {res['head']}) vs without the hooks ({res['baseline']}), "
              f"same rate, same {args.otel_rounds} rounds (medians over rounds; ratio: median "
              "of the rounds' ratios; noise: the baseline build against itself):")
        print(table(["figure", "hooks, tracing off", "without hooks", "ratio", "noise ratio"],
                    [[what, cmp[k]["hooks_off"], cmp[k]["without_hooks"], cmp[k]["ratio"],
                      cmp[k]["noise_ratio"]]
                     for k, what in (("added_p50_ms", "added p50 ms"),
                                     ("added_p99_ms", "added p99 ms"),
                                     ("cpu_us_per_req", "router cpu us/req"))]))

    if args.otel_only:
        await otel_phase()
        while current:
            kids.stop(current.pop())
        return out

    if args.tiers_only:
        await tier_phase()
        while current:
            kids.stop(current.pop())
        return out

    if args.slow_readers_only:
        await slow_phase()
        while current:
            kids.stop(current.pop())
        return out

    # 1. Closed loop: direct, `spillover serve`, the same app under uvicorn's own runner
    # (uvloop) with N workers, and GET /healthz (server + framework, no upstream call).
    closed_rows: list[list[Any]] = []
    out["closed_loop"] = {}

    async def closed(t: Target, label: str, what: bytes | None = payload,
                     concurrency: list[int] | None = None) -> None:
        best: dict[str, Any] | None = None
        for c in concurrency or args.concurrency:
            meter = CpuMeter({"target": t.pid, "loadgen": me})
            meter.start()
            r = await closed_loop(t, c, args.closed_duration, 1.0, what)
            cpu = meter.stop()
            r["cpu_us_per_req"] = {k: round(v / max(1, r["n"]) * 1e6) for k, v in cpu.items()}
            closed_rows.append([label, c, r["rps"], r["p50_ms"], r["p99_ms"], r["errors"],
                                r["cpu_us_per_req"]["target"],
                                r["cpu_us_per_req"]["loadgen"]])
            if best is None or r["rps"] > best["rps"]:
                best = r
        assert best is not None
        out["closed_loop"][label] = {"max_rps": best["rps"], "best": best}

    def print_closed(title: str) -> None:
        print(f"\n{title}", flush=True)
        print(table(["target", "conns", "req/s", "p50 ms", "p99 ms", "errors",
                     "target cpu us/req", "loadgen cpu us/req"], closed_rows))
        closed_rows.clear()

    await closed(direct, "direct")
    await closed(bare, "bare-proxy")
    router = await fresh("router")
    await closed(router, "router")
    await closed(router, "router GET /healthz", None)
    for w in args.workers:
        t = await fresh(f"router-uvicorn-x{w}", w, "uvicorn")
        await closed(t, t.name)
    print_closed("Closed loop (each connection sends its next request when the answer is in)")

    # 2. Open loop, direct then router at each rate; then a closed loop on that router.
    router = await fresh("router")
    rows = []
    out["open_loop"] = []
    for rate in args.rates:
        pair: dict[str, Any] = {"rate": rate}
        for t in (direct, bare, router):
            meter = CpuMeter({"target": t.pid, "loadgen": me})
            meter.start()
            r = await open_loop(t, rate, dur, warm, payload)
            cpu = meter.stop()
            n = max(1, int((dur + warm) * rate))
            r["cpu_us_per_req"] = {k: round(v / n * 1e6) for k, v in cpu.items()}
            pair[t.name] = r
            rows.append([rate, t.name, r["n"], r["p50_ms"], r["p90_ms"], r["p99_ms"],
                         r["max_ms"], sum(r["errors"].values()),
                         r["cpu_us_per_req"]["target"], r["cpu_us_per_req"]["loadgen"]])
        pair["added_p50_ms"] = round(pair["router"]["p50_ms"] - pair["direct"]["p50_ms"], 3)
        pair["added_p99_ms"] = round(pair["router"]["p99_ms"] - pair["direct"]["p99_ms"], 3)
        for q in ("p50", "p99"):
            pair[f"bare_added_{q}_ms"] = round(
                pair["bare-proxy"][f"{q}_ms"] - pair["direct"][f"{q}_ms"], 3)
        out["open_loop"].append(pair)
    print("\nOpen loop (latency from the scheduled send time, ms)", flush=True)
    print(table(["req/s", "target", "n", "p50", "p90", "p99", "max", "errors",
                 "target cpu us/req", "loadgen cpu us/req"], rows))
    for pair in out["open_loop"]:
        print(f"  added at {pair['rate']:g} req/s: p50 {pair['added_p50_ms']:+.3f} ms, "
              f"p99 {pair['added_p99_ms']:+.3f} ms (bare proxy: p50 "
              f"{pair['bare_added_p50_ms']:+.3f} ms, p99 {pair['bare_added_p99_ms']:+.3f} ms)")
    await closed(router, "router-after-open-loop", concurrency=[8])

    # 3. Streams. The targets take turns in short rounds and each one's samples are
    # pooled: a change in the shared host's load during the phase then falls on all
    # three alike instead of on whichever target was running at the time.
    router = await fresh("router")
    rows = []
    out["streams"] = {}
    targets = (direct, bare, router)
    per_round: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    cpu: dict[str, float] = dict.fromkeys(per_round, 0.0)
    for _ in range(args.stream_rounds):
        for t in targets:
            meter = CpuMeter({"target": t.pid})
            meter.start()
            per_round[t.name].append(await streams(
                t, args.stream_rate, dur / args.stream_rounds, args.stream_tokens,
                args.stream_interval))
            cpu[t.name] += meter.stop()["target"]
    for t in targets:
        r = pooled(per_round[t.name])
        del r["samples"]
        r["cpu_us_per_stream"] = round(cpu[t.name] / max(1, r["n"]) * 1e6)
        r["cpu_us_per_chunk"] = round(cpu[t.name] / max(1, r["n"] * (args.stream_tokens + 1))
                                      * 1e6)
        r["round_ttft_p50_ms"] = [x["ttft_p50_ms"] for x in per_round[t.name]]
        out["streams"][t.name] = r
        rows.append([t.name, r["n"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["chunk_lag_p50_ms"],
                     r["chunk_lag_p99_ms"], r["errors"] + r["wrong_chunk_count"],
                     r["cpu_us_per_stream"], r["cpu_us_per_chunk"]])
    s = out["streams"]
    for key in ("ttft_p50", "ttft_p99", "chunk_lag_p50", "chunk_lag_p99"):
        s[f"added_{key}_ms"] = round(s["router"][f"{key}_ms"] - s["direct"][f"{key}_ms"], 3)
        s[f"bare_added_{key}_ms"] = round(
            s["bare-proxy"][f"{key}_ms"] - s["direct"][f"{key}_ms"], 3)
    print(f"\nStreams ({args.stream_rate:g}/s, {args.stream_tokens} chunks "
          f"{args.stream_interval * 1000:g} ms apart, {args.stream_rounds} interleaved rounds; "
          "chunk lag = arrival - send - i*interval)", flush=True)
    print(table(["target", "n", "ttft p50", "ttft p99", "chunk lag p50", "chunk lag p99",
                 "errors", "cpu us/stream", "cpu us/chunk"], rows))
    print(f"  added: TTFT p50 {s['added_ttft_p50_ms']:+.3f} ms / p99 "
          f"{s['added_ttft_p99_ms']:+.3f} ms, per chunk p50 {s['added_chunk_lag_p50_ms']:+.3f}"
          f" ms / p99 {s['added_chunk_lag_p99_ms']:+.3f} ms")
    print(f"  bare proxy: TTFT p50 {s['bare_added_ttft_p50_ms']:+.3f} ms, per chunk p50 "
          f"{s['bare_added_chunk_lag_p50_ms']:+.3f} ms")

    # 4. Many open streams, on a fresh router so its RSS starts from idle; then a closed
    # loop on that router, whose upstream pool now holds as many idle connections as
    # there were streams.
    router = await fresh("router")
    await asyncio.sleep(1.0)
    rows = []
    out["open_streams"] = {}
    for t in (direct, router):
        r = await many_streams(t, args.open_streams, args.hold_chunks, args.hold_interval,
                               args.ramp_s)
        out["open_streams"][t.name] = r
        rows.append([t.name, r["streams"], r["peak_open"], json.dumps(r["outcomes"]),
                     r["chunk_lag_p50_ms"], r["chunk_lag_p99_ms"], r["rss_before_mb"],
                     r["rss_peak_mb"], r["rss_after_mb"], r["kb_per_open_stream"]])
    print(f"\n{args.open_streams} streams held open ({args.hold_chunks} chunks "
          f"{args.hold_interval:g} s apart; lag = chunk i arrival - first chunk - i*interval;"
          " RSS of that target's process tree)", flush=True)
    print(table(["target", "streams", "peak open", "outcomes", "lag p50 ms", "lag p99 ms",
                 "RSS MB before", "peak", "after", "KB/stream"], rows))
    await closed(router, "router-after-open-streams", concurrency=[8])
    print_closed("Closed loop on the routers of phases 2 and 4, right after their load")
    await tier_phase()
    await otel_phase()
    await slow_phase()
    while current:
        kids.stop(current.pop())

    if args.profile:
        prof_router = await fresh("router-profiled")
        raw = tmp / "router.prof.txt"
        prof = await profiled_load(prof_router, args.profile, max(args.concurrency),
                                   raw, args.profile_rate, args.profile_load, args)
        out["profile"] = prof
        if "error" in prof:
            print(f"\nprofile: {prof['error']}")
        else:
            rate = prof["load"].get("rps", prof["load"].get("rate"))
            print(f"\nRouter profile under {args.profile_load} load ({prof['samples']} "
                  f"samples, {rate} req/s while sampled; % of samples)")
            print("  (py-spy does not always unwind to the root of a stack: inclusive shares of"
                  " outer frames are undercounts, self shares are not)")
            for key in ("self_by_layer", "self", "self_by_module", "inclusive",
                        "inclusive_by_module"):
                print(f"  top {key}:")
                for frame, share in prof[key][:args.profile_top]:
                    print(f"    {share:5.1f}  {frame}")
            if args.profile_out:
                args.profile_out.write_bytes(raw.read_bytes())
    return out


def summary(out: dict[str, Any]) -> dict[str, Any]:
    by_rate = {p["rate"]: p for p in out["open_loop"]}
    r300 = by_rate.get(300)
    cl = out["closed_loop"]
    return {
        "added_p50_ms_at_300": r300["added_p50_ms"] if r300 else None,
        "added_p99_ms_at_300": r300["added_p99_ms"] if r300 else None,
        "closed_loop_rps": {k: v["max_rps"] for k, v in cl.items()},
        "added_ttft_p50_ms": out["streams"]["added_ttft_p50_ms"],
        "added_chunk_p50_ms": out["streams"]["added_chunk_lag_p50_ms"],
        "bare_proxy_added_p50_ms_at_300": r300["bare_added_p50_ms"] if r300 else None,
        "bare_proxy_added_ttft_p50_ms": out["streams"]["bare_added_ttft_p50_ms"],
        "router_rss_peak_mb_open_streams": out["open_streams"]["router"]["rss_peak_mb"],
        "tier_decision_added_p50_ms": out["tiers"]["tier_decision_p50_ms"],
        "targets_met": {
            "added_p50_le_1ms_at_300": bool(r300 and r300["added_p50_ms"] <= 1.0),
            "added_p99_le_3ms_at_300": bool(r300 and r300["added_p99_ms"] <= 3.0),
            "closed_loop_ge_1500": cl["router"]["max_rps"] >= 1500,
            "stream_ttft_added_le_1ms": out["streams"]["added_ttft_p50_ms"] <= 1.0,
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run: shorter phases")
    p.add_argument("--rates", type=float, nargs="+", default=[100, 300])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per open-loop rate")
    p.add_argument("--closed-duration", type=float, default=6.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="worker counts of the uvicorn-runner routers in the closed loop")
    p.add_argument("--stream-rate", type=float, default=50.0)
    p.add_argument("--stream-tokens", type=int, default=10)
    p.add_argument("--stream-interval", type=float, default=0.01)
    p.add_argument("--stream-rounds", type=int, default=5,
                   help="turns each target takes in the streams phase (samples pooled)")
    p.add_argument("--open-streams", type=int, default=1000)
    p.add_argument("--hold-chunks", type=int, default=8, help="chunks per held-open stream")
    p.add_argument("--hold-interval", type=float, default=0.5)
    p.add_argument("--ramp-s", type=float, default=1.0)
    p.add_argument("--slow-readers", type=int, default=20,
                   help="callers reading a long stream 1 KB every 50 ms (last phase)")
    p.add_argument("--slow-duration", type=float, default=10.0,
                   help="seconds of ordinary requests alone, then beside the slow readers")
    p.add_argument("--slow-fill", type=float, default=8.0,
                   help="seconds the slow streams run before the ordinary requests start")
    p.add_argument("--slow-rate", type=float, default=50.0,
                   help="ordinary requests/s in the slow-reader phase")
    p.add_argument("--slow-readers-only", action="store_true",
                   help="run only the slow-reader phase")
    p.add_argument("--tier-rate", type=float, default=200.0,
                   help="requests/s of the tiered-alias phase")
    p.add_argument("--tier-duration", type=float, default=4.0,
                   help="seconds per round and target in the tiered-alias phase")
    p.add_argument("--tier-rounds", type=int, default=3)
    p.add_argument("--tiers-only", action="store_true",
                   help="run only the tiered-alias phase (the scorer's added p50)")
    p.add_argument("--otel-rate", type=float, default=200.0,
                   help="OpenTelemetry phase: open-loop req/s per round")
    p.add_argument("--otel-duration", type=float, default=4.0,
                   help="OpenTelemetry phase: seconds per round")
    p.add_argument("--otel-rounds", type=int, default=3)
    p.add_argument("--otel-baseline", metavar="REF", nargs="?", const="stripped",
                   help="in the OpenTelemetry phase, also a router without the tracing "
                        "hooks: 'stripped' (the default: HEAD with them compiled out, in a "
                        "temporary git worktree) or a git commit; the tracing-off router "
                        "then runs from HEAD's own worktree")
    p.add_argument("--otel-only", action="store_true",
                   help="run only the OpenTelemetry phase (tracing off vs on)")
    p.add_argument("--max-connections", type=int, default=2048,
                   help="server.max_connections of the router (its upstream pool)")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="also py-spy the router under closed-loop load this long")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    p.add_argument("--profile-load", choices=("closed", "streams"), default="closed",
                   help="the load under which the router is profiled")
    p.add_argument("--profile-top", type=int, default=20)
    p.add_argument("--profile-out", type=Path, help="keep py-spy's collapsed stacks here")
    p.add_argument("--out", type=Path,
                   help="also write the figures here (default: a temporary file, so a run "
                        "leaves the repository as it was)")
    p.add_argument("--publish", action="store_true",
                   help=f"write the figures to {PUBLISHED.relative_to(ROOT)}, the file the "
                        "README's table quotes")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.duration, args.closed_duration = 3.0, 3.0
        args.concurrency = [16]
        args.open_streams, args.hold_chunks = 300, 6
        args.stream_rounds = 3
    # Every request carries the bench caller's key (the upstream and the bare proxy
    # ignore it).
    Conn.extra_headers = AUTH
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="spillover-bench-"))
    try:
        with sigterm_as_exit(), Children(tmp / "logs") as kids:
            out = uvloop.run(run(args, kids, tmp))
    except KeyboardInterrupt:
        print("interrupted; children stopped", file=sys.stderr)
        return 130
    finally:
        if not args.keep_logs:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs in {tmp}/logs", file=sys.stderr)
    if not (args.slow_readers_only or args.tiers_only or args.otel_only):
        out["summary"] = summary(out)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    if "summary" in out:
        print("\nsummary:", json.dumps(out["summary"], indent=1))
    dest = args.out or (PUBLISHED if args.publish else
                        Path(tempfile.gettempdir()) / "spillover-bench-overhead.json")
    emit(out, dest)
    print(f"figures written to {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
