#!/usr/bin/env python3
"""Does keeping a conversation on one engine replica pay? Real vLLM CPU engines with prefix
caching, a multi-turn workload, least-loaded vs conversation affinity in one run, in two
regimes: a KV cache that holds every conversation on every replica (ample), and one that
holds only a replica's share of them (pressure), as on a busy GPU.

    .venv/bin/python scripts/bench_affinity.py               # 2 engines, ~6 min on 2 cores
    .venv/bin/python scripts/bench_affinity.py --replicas 4  # + a 4-replica pressure regime
    .venv/bin/python scripts/bench_affinity.py --publish     # figures to docs/affinity.json

1. Starts the engines (serving.engine, the demo model, --enable-prefix-caching,
   --num-gpu-blocks-override --kv-blocks: each engine's KV cache, read back from vLLM's
   vllm:cache_config_info) on 127.0.0.2, 127.0.0.3, ... at one port, each pinned to a CPU
   (--no-pin: not pinned): pods behind one headless Service, on one machine.
2. Per regime (--regime REPLICAS:LOAD, repeatable; default 2:0.7 and 2:1.8, plus 4:3.2
   with --replicas 4): as many conversations as make LOAD times one engine's KV cache
   (each conversation counted at its last turn, prompt tokens by the engine's own
   /tokenize), served by the first REPLICAS engines. At LOAD < 1 every replica can cache
   every conversation, so least-loaded loses only what a conversation sent since its last
   visit to that replica; at 1 < LOAD < REPLICAS a replica can hold its share of the
   conversations (affinity) but not all of them (least-loaded: its LRU cache cycles
   through every conversation and evicts each one before it comes back).
3. Per regime, two routers in turn (scripts/benchlib/replicarouter.py: `spillover serve
   --no-engines`'s app, whose `discover` name resolves to the regime's engines):
   least-loaded (the conversation key withheld), then affinity (rendezvous hashing of the
   conversation key, bounded load). Each phase its own fresh conversations (a long document
   of its own opening each, so no two share a prefix). All of a phase's conversations run
   at once, each waiting a think time before each turn (uniform 0..--think-s), so the
   turns of different conversations interleave as a gateway sees them; every turn resends
   the whole conversation so far plus a new user message; streamed, a few output tokens.
4. Reports vLLM's own prefix-cache hit rate over the phase (vllm:prefix_cache_hits /
   vllm:prefix_cache_queries, in tokens, summed over the regime's engines' /metrics), how
   the prompt tokens split between the engines, and the time to first token per turn
   (median, p90), and per regime whether the targets hold: affinity at least doubles the
   hit rate and lowers the median TTFT of the later turns (turn 2 on). Tables and one JSON
   line; the JSON goes to a temporary file unless --publish.
The engines, the routers and the load generator share a 2-core machine: noisy TTFTs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.procs import ROOT, VENV_BIN, Children, sigterm_as_exit, wait_http
from benchlib.stats import emit, finite, pct, table

HOST = "127.0.0.1"
ALIAS = "demo"
# The engines' addresses, one port: 127.0.0.2, .3, ... (--replicas; set once in main).
REPLICAS = ["127.0.0.2", "127.0.0.3"]
DISCOVER = "demo.bench.svc.cluster.local"
MAX_MODEL_LEN = 4096
PHASES = ("least-loaded", "affinity")
# exec the engine with PR_SET_PDEATHSIG (it dies with this process, however that ends),
# on its own CPUs when asked.
_PDEATH_EXEC = ("import ctypes, os, signal, sys; "
                "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
                "{cpus} and os.sched_setaffinity(0, {cpus}); "
                "os.execv(sys.argv[1], sys.argv[1:])")
_VOCABULARY = ("ledger budget replica engine prompt cache token router policy deploy "
               "cluster service tenant license export report nightly retry timeout "
               "dashboard alert queue batch stream invoice region storage window metric "
               "latency capacity schedule rollout canary secret config volume network "
               "gateway fallback quota model weight tensor kernel memory thread socket")
_WORDS = _VOCABULARY.split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def shared_free_port() -> int:
    """A port free on every replica address (each engine binds its own address)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((REPLICAS[0], 0))
            port = int(s.getsockname()[1])
        try:
            for addr in REPLICAS[1:]:
                with socket.socket() as s:
                    s.bind((addr, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every replica address")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# --- engines -------------------------------------------------------------------------


async def start_engines(port: int, log_dir: Path, pin: bool, within_s: float,
                        kv_blocks: int) -> list[Any]:
    from serving.demo_model import build_demo_model
    from serving.engine import EngineProcess, EngineSpec, engine_command

    model_dir = await asyncio.to_thread(build_demo_model, ROOT / ".spillover" / "demo-model")
    cpus = sorted(os.sched_getaffinity(0))
    procs = []
    for i, addr in enumerate(REPLICAS):
        mine = {cpus[i % len(cpus)]} if pin else set()
        env = [("VLLM_CPU_KVCACHE_SPACE", "1")]  # the block count below decides
        if mine:  # vLLM's own OpenMP binding would otherwise pick the cores itself
            env.append(("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(mine)))))
        spec = EngineSpec(name=f"bench-replica-{i}", model=str(model_dir),
                          served_model_name=ALIAS, host=addr, port=port,
                          max_model_len=MAX_MODEL_LEN,
                          extra_args=engine_flags(kv_blocks), env=tuple(env))
        cmd = [sys.executable, "-c", _PDEATH_EXEC.format(cpus=sorted(mine)),
               *engine_command(spec)]
        proc = EngineProcess(spec, log_dir=log_dir, command=cmd)
        procs.append(proc)
        await proc.start()
    await asyncio.gather(*(p.wait_ready(timeout=within_s) for p in procs))
    return procs


def engine_flags(kv_blocks: int) -> tuple[str, ...]:
    return ("--enable-prefix-caching", "--num-gpu-blocks-override", str(kv_blocks))


async def cache_config(client: httpx.AsyncClient, port: int) -> dict[str, str]:
    """vLLM's vllm:cache_config_info labels (block_size, num_gpu_blocks, ...) of a replica."""
    body = (await client.get(f"http://{REPLICAS[0]}:{port}/metrics")).text
    for line in body.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = line[line.index("{") + 1:line.rindex("}")]
            return {k: v.strip('"') for k, _, v in
                    (pair.partition("=") for pair in labels.split('",'))}
    return {}


async def cache_counters(client: httpx.AsyncClient, port: int,
                         addrs: list[str]) -> dict[str, tuple[float, float]]:
    """Per replica: vLLM's prefix-cache (hits, queries) counters, in tokens."""
    out = {}
    for addr in addrs:
        hits = queries = 0.0
        body = (await client.get(f"http://{addr}:{port}/metrics")).text
        for line in body.splitlines():
            if line.startswith("#"):
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
        out[addr] = (hits, queries)
    return out


# --- routers -------------------------------------------------------------------------


def router_config(port: int) -> dict[str, Any]:
    return {
        "server": {"request_timeout_s": 120, "metrics_interval_s": 0.25,
                   "metrics_stale_s": 5, "discover_interval_s": 60,
                   "ledger_path": ":memory:"},
        "aliases": {ALIAS: {"local": [{
            "name": "demo-replicas", "model": ALIAS, "license": "apache-2.0",
            "served_model_name": ALIAS, "discover": DISCOVER, "port": port,
            # The router's prompt bound counts UTF-8 bytes (a token per byte at most), which
            # for these prompts is about 6x their tokens; the engine checks the real count
            # against its own --max-model-len.
            "max_model_len": 8 * MAX_MODEL_LEN,
            # Generous: the comparison is about where requests go, not when they spill.
            "saturation": {"max_inflight": 64, "max_waiting": 64, "max_kv_cache": 1.0}}]}},
    }


async def start_router(kids: Children, phase: str, engine_port: int, tmp: Path,
                       addrs: list[str]) -> int:
    """A router whose discover name resolves to `addrs`; least-loaded or affinity by the
    phase's name."""
    cfg = tmp / f"router-{phase}.yaml"
    cfg.write_text(json.dumps(router_config(engine_port), indent=2))
    port = free_port()
    proc = kids.start(f"router-{phase}", [
        str(VENV_BIN / "uvicorn"), "benchlib.replicarouter:app", "--factory",
        "--app-dir", str(ROOT / "scripts"), "--host", HOST, "--port", str(port),
        "--log-level", "warning", "--no-access-log"],
        env={"SPILLOVER_CONFIG": str(cfg), "BENCH_REPLICAS": ",".join(addrs),
             "BENCH_AFFINITY": "1" if phase.endswith("affinity") else "0"})
    try:
        await asyncio.to_thread(wait_http, f"http://{HOST}:{port}/readyz", 60, proc, phase)
    except RuntimeError:
        print(kids.log_tail(f"router-{phase}"), file=sys.stderr)
        raise
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        for _ in range(100):  # until both replicas are found and probed
            status = (await client.get(f"http://{HOST}:{port}/status")).json()
            found = status.get("engines", {}).get("demo-replicas", {}).get("replicas") or []
            if len(found) == len(addrs):
                break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"router {phase}: replicas not found: {status}")
    return port


# --- workload ------------------------------------------------------------------------


def script(seed: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    """One conversation: per turn, the user's message and the answer the next turn repeats.
    The answers are fixed text, so both phases send the same bytes (the random-weight
    model's own answers would differ between engines)."""
    rng = random.Random(seed)
    turns = []
    for t in range(args.turns):
        # The long context opens the first user message, not a system message: Mistral's
        # chat template renders the system prompt inside the LAST user turn, so a system
        # prompt moves every turn and no turn's prompt starts with the previous one.
        opening = f"conversation {seed}. {text(rng, args.context_words)}\n\n" if t == 0 else ""
        turns.append((opening + text(rng, args.user_words), text(rng, args.assistant_words)))
    return turns


def messages_at(turns: list[tuple[str, str]], t: int) -> list[dict[str, str]]:
    """The messages of turn t (0-based): every earlier turn and its answer, then turn t."""
    out: list[dict[str, str]] = []
    for user, answer in turns[:t]:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    out.append({"role": "user", "content": turns[t][0]})
    return out


async def count_tokens(client: httpx.AsyncClient, url: str,
                        messages: list[dict[str, str]]) -> int:
    """The prompt's tokens as the engine counts them (its tokenizer and chat template)."""
    r = await client.post(url, json={"model": ALIAS, "messages": messages})
    r.raise_for_status()
    return int(r.json()["count"])


async def conversations_for(client: httpx.AsyncClient, engine_port: int, seed0: int,
                            target_tokens: float, args: argparse.Namespace,
                            ) -> tuple[list[int], int]:
    """Seeds of as many conversations as make `target_tokens` at their last turn (what
    their KV cache blocks hold when each is complete), and that total."""
    url = f"http://{REPLICAS[0]}:{engine_port}/tokenize"
    seeds: list[int] = []
    total = 0
    while total < target_tokens or len(seeds) < 2:
        seed = seed0 + len(seeds)
        turns = script(seed, args)
        total += await count_tokens(client, url, messages_at(turns, args.turns - 1)) + (
            args.max_tokens)
        seeds.append(seed)
    return seeds, total


async def turn(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]],
               max_tokens: int, timeout_s: float) -> tuple[float, int, str]:
    """One streamed request: (TTFT s, prompt tokens, error)."""
    body = {"model": ALIAS, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    started = time.perf_counter()
    ttft, prompt_tokens = math.inf, 0
    try:
        async with asyncio.timeout(timeout_s), client.stream(
                "POST", url, content=orjson.dumps(body),
                headers={"content-type": "application/json"}) as r:
            if r.status_code != 200:
                return ttft, 0, f"status {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = orjson.loads(line[6:])
                if math.isinf(ttft) and event.get("choices"):
                    ttft = time.perf_counter() - started
                if event.get("usage"):
                    prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
    except (TimeoutError, httpx.HTTPError) as exc:
        return ttft, prompt_tokens, type(exc).__name__
    return ttft, prompt_tokens, "" if math.isfinite(ttft) else "no content event"


async def conversation(client: httpx.AsyncClient, url: str, seed: int,
                       args: argparse.Namespace, out: list[dict[str, Any]]) -> None:
    """A user's conversation: think, send the turn, wait for its answer, think, ..."""
    turns = script(seed, args)
    pause = random.Random(-seed)
    for t in range(args.turns):
        await asyncio.sleep(pause.uniform(0, args.think_s))
        ttft, tokens, error = await turn(client, url, messages_at(turns, t), args.max_tokens,
                                         args.timeout)
        out.append({"conv": seed, "turn": t + 1, "ttft_s": ttft,
                    "prompt_tokens": tokens, "error": error})


async def phase(name: str, router_port: int, engine_port: int, seeds: list[int],
                addrs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://{HOST}:{router_port}/v1/chat/completions"
    recs: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=len(seeds) + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits,
                                 trust_env=False) as client:
        before = await cache_counters(client, engine_port, addrs)
        t0 = time.monotonic()
        await asyncio.gather(*(conversation(client, url, seed, args, recs) for seed in seeds))
        wall = time.monotonic() - t0
        await asyncio.sleep(1.0)  # the engines' metrics catch up with the last requests
        after = await cache_counters(client, engine_port, addrs)
    per_replica = {a: {"hits": after[a][0] - before[a][0],
                       "queries": after[a][1] - before[a][1]} for a in addrs}
    hits = sum(r["hits"] for r in per_replica.values())
    queries = sum(r["queries"] for r in per_replica.values())
    ok = [r for r in recs if not r["error"]]
    by_turn = {}
    for t in range(1, args.turns + 1):
        ttfts = [r["ttft_s"] for r in ok if r["turn"] == t]
        tokens = [r["prompt_tokens"] for r in ok if r["turn"] == t]
        by_turn[t] = {"n": len(ttfts), "ttft_p50_s": pct(ttfts, 50),
                      "ttft_p90_s": pct(ttfts, 90),
                      "prompt_tokens_mean": sum(tokens) / len(tokens) if tokens else math.nan}
    later = [r["ttft_s"] for r in ok if r["turn"] >= 2]
    return {
        "phase": name, "conversations": len(seeds), "requests": len(recs),
        "errors": len(recs) - len(ok),
        "error_samples": sorted({r["error"] for r in recs if r["error"]})[:3],
        "errors_by_turn": {t: sum(1 for r in recs if r["turn"] == t and r["error"])
                           for t in range(1, args.turns + 1)},
        "wall_s": round(wall, 1),
        "prefix_cache_hit_rate": hits / queries if queries else math.nan,
        "prefix_cache_hits_tokens": hits, "prefix_cache_queries_tokens": queries,
        "queries_share_per_replica": {a: (r["queries"] / queries if queries else math.nan)
                                      for a, r in per_replica.items()},
        "ttft_later_turns_p50_s": pct(later, 50), "ttft_later_turns_p90_s": pct(later, 90),
        "ttft_first_turn_p50_s": by_turn[1]["ttft_p50_s"],
        "by_turn": by_turn,
    }


async def warm_up(engine_port: int, args: argparse.Namespace) -> None:
    """A few requests straight to each engine: the first ones compile and allocate."""
    rng = random.Random(-1)
    async with httpx.AsyncClient(timeout=args.timeout, trust_env=False) as client:
        for addr in REPLICAS:
            for _ in range(3):
                messages = [{"role": "user", "content": text(rng, args.context_words)}]
                await turn(client, f"http://{addr}:{engine_port}/v1/chat/completions",
                           messages, args.max_tokens, args.timeout)


async def regime(kids: Children, tmp: Path, engine_port: int, replicas: int, load: float,
                 cache_tokens: int, index: int, args: argparse.Namespace) -> dict[str, Any]:
    """Least-loaded then affinity over the first `replicas` engines, each phase with fresh
    conversations worth `load` times one engine's KV cache."""
    addrs = REPLICAS[:replicas]
    label = f"{replicas} replicas, load {load:g}"
    results: dict[str, Any] = {}
    for i, name in enumerate(PHASES):
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            seeds, tokens = await conversations_for(
                client, engine_port, (args.seed * 100 + 10 * index + i) * 1000,
                load * cache_tokens, args)
        port = await start_router(kids, f"{index}-{name}", engine_port, tmp, addrs)
        print(f"{label}: {name}, {len(seeds)} conversations "
              f"({tokens} tokens at their last turn)...", file=sys.stderr)
        results[name] = await phase(name, port, engine_port, seeds, addrs, args)
        results[name]["working_set_tokens"] = tokens
        kids.stop(f"router-{index}-{name}")
    ll, aff = results["least-loaded"], results["affinity"]
    ratio = (aff["prefix_cache_hit_rate"] / ll["prefix_cache_hit_rate"]
             if ll["prefix_cache_hit_rate"] else math.inf)
    return {
        "regime": label, "replicas": replicas, "load": load,
        # The working set over what all the regime's replicas can hold at once: below 1,
        # affinity can keep every conversation cached (once, on its own replica).
        "load_per_replica_share": load / replicas,
        "phases": results, "hit_rate_ratio": ratio,
        "targets_met": {
            "hit_rate_at_least_doubled": ratio >= 2.0,
            "later_turns_ttft_p50_lower": (aff["ttft_later_turns_p50_s"]
                                           < ll["ttft_later_turns_p50_s"]),
        },
    }


async def engine_log_blocks(engines: list[Any]) -> list[str]:
    """What each engine's log says of its KV cache (vLLM prints the size it allocated)."""
    lines = []
    for e in engines:
        try:
            text_ = e.log_path.read_text(errors="replace")
        except OSError:
            continue
        lines += [line.strip()[-160:] for line in text_.splitlines()
                  if "KV cache size" in line or "num_gpu_blocks" in line
                  or "Maximum concurrency" in line][:3]
    return lines


async def run(args: argparse.Namespace, kids: Children, tmp: Path,
              engines: list[Any]) -> dict[str, Any]:
    engine_port = shared_free_port()
    print(f"starting {len(REPLICAS)} engines on {', '.join(REPLICAS)}:{engine_port} "
          f"({'one CPU each' if args.pin else 'unpinned'})...", file=sys.stderr)
    t = time.monotonic()
    engines.extend(await start_engines(engine_port, tmp / "logs", args.pin,
                                       args.engine_timeout, args.kv_blocks))
    print(f"engines ready in {time.monotonic() - t:.0f} s", file=sys.stderr)
    await warm_up(engine_port, args)
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        cache = await cache_config(client, engine_port)
    block = int(cache.get("block_size") or 0)
    blocks = int(cache.get("num_gpu_blocks") or 0)
    if not block * blocks:
        raise RuntimeError(f"the engine's KV cache size is unknown: {cache}")
    log_lines = await engine_log_blocks(engines)
    print(f"KV cache per engine: {blocks} blocks of {block} tokens = {block * blocks} tokens; "
          f"engine log: {log_lines[:2]}", file=sys.stderr)
    regimes = [await regime(kids, tmp, engine_port, r, load, block * blocks, i, args)
               for i, (r, load) in enumerate(args.regime)]
    out = {
        "benchmark": "affinity",
        "workload": {k: getattr(args, k) for k in (
            "turns", "context_words", "user_words", "assistant_words",
            "max_tokens", "think_s", "seed", "pin", "kv_blocks", "replicas")},
        "engines": {"replicas": list(REPLICAS), "max_model_len": MAX_MODEL_LEN,
                    "flags": list(engine_flags(args.kv_blocks)), "block_size": block,
                    "kv_cache_blocks": blocks, "kv_cache_tokens": block * blocks,
                    "engine_log": log_lines},
        "regimes": regimes,
        "targets_met": {r["regime"]: r["targets_met"] for r in regimes},
    }
    rows = []
    for r in regimes:
        for ph in r["phases"].values():
            rows.append([r["regime"], ph["phase"], ph["conversations"], ph["requests"],
                         ph["errors"], 100 * ph["prefix_cache_hit_rate"],
                         " / ".join(f"{100 * s:.0f}%"
                                    for s in ph["queries_share_per_replica"].values()),
                         1000 * ph["ttft_first_turn_p50_s"],
                         1000 * ph["ttft_later_turns_p50_s"],
                         1000 * ph["ttft_later_turns_p90_s"], ph["wall_s"]])
        rows.append([r["regime"], "ratio", "", "", "", r["hit_rate_ratio"], "", "", "", "", ""])
    print(table(["regime", "routing", "conversations", "requests", "errors", "prefix hit %",
                 "tokens per replica", "TTFT turn 1 p50 ms", "TTFT turns 2+ p50 ms",
                 "p90 ms", "wall s"], rows))
    for r in regimes:
        ll, aff = r["phases"]["least-loaded"], r["phases"]["affinity"]
        print(f"\n{r['regime']}")
        print(table(["turn", "prompt tokens", "least-loaded TTFT p50 ms",
                     "affinity TTFT p50 ms"],
                    [[t, ll["by_turn"][t]["prompt_tokens_mean"],
                      1000 * ll["by_turn"][t]["ttft_p50_s"],
                      1000 * aff["by_turn"][t]["ttft_p50_s"]] for t in ll["by_turn"]]))
    return out


def regime_arg(value: str) -> tuple[int, float]:
    replicas, _, load = value.partition(":")
    try:
        out = int(replicas), float(load)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected REPLICAS:LOAD, e.g. 2:1.8"
                                         ) from None
    if out[0] < 1 or not 0 < out[1] <= 64:
        raise argparse.ArgumentTypeError(f"{value!r}: REPLICAS >= 1, 0 < LOAD <= 64")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", type=regime_arg, action="append",
                   help="REPLICAS:LOAD: conversations worth LOAD times one engine's KV cache "
                   "over the first REPLICAS engines (repeatable; default 2:0.7 and 2:1.8, "
                   "plus 4:3.2 with --replicas 4 or more)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--context-words", type=int, default=800,
                   help="each conversation's own document, at the start of its first turn")
    p.add_argument("--user-words", type=int, default=80)
    p.add_argument("--assistant-words", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--think-s", type=float, default=2.0,
                   help="pause before each turn: uniform from 0 to this")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--engine-timeout", type=float, default=600.0)
    p.add_argument("--replicas", type=int, default=2,
                   help="engines (each pinned to CPU i mod the CPUs this process may use)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin each engine to a CPU of its own")
    p.add_argument("--kv-blocks", type=int, default=128,
                   help="each engine's KV cache in blocks (--num-gpu-blocks-override; "
                   "128 tokens a block on CPU); at least --max-model-len's worth")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, help="write the figures here (default: temporary)")
    p.add_argument("--publish", action="store_true",
                   help="write the figures to docs/affinity.json, the file the README quotes")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args()
    if not 2 <= args.replicas <= 16:
        p.error("--replicas must be from 2 to 16")
    REPLICAS[:] = [f"127.0.0.{2 + i}" for i in range(args.replicas)]
    if args.regime is None:
        args.regime = [(2, 0.7), (2, 1.8)] + ([(4, 3.2)] if args.replicas >= 4 else [])
    if any(r > args.replicas for r, _ in args.regime):
        p.error("a --regime uses more replicas than --replicas starts")
    if args.out is None:
        args.out = (ROOT / "docs" / "affinity.json" if args.publish
                    else Path(tempfile.gettempdir()) / "spillover-bench-affinity.json")
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="spillover-affinity-"))
    engines: list[Any] = []
    try:
        with sigterm_as_exit(), Children(tmp / "logs") as kids:
            async def go() -> dict[str, Any]:
                try:
                    return await run(args, kids, tmp, engines)
                finally:
                    for e in engines:
                        await e.stop(grace=10)

            out = uvloop.run(go())
    except KeyboardInterrupt:
        print("interrupted; children stopped", file=sys.stderr)
        return 130
    finally:
        for e in engines:
            with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
                os.killpg(e.pid, 9)
        if args.keep_logs:
            print(f"logs in {tmp}/logs", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["command"] = "scripts/bench_affinity.py " + " ".join(sys.argv[1:])
    print("\ntargets:", json.dumps(out["targets_met"], indent=1))
    emit(finite(out), args.out)
    print(f"figures written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
