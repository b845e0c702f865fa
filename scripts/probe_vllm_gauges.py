"""What vLLM's own gauges say under load, straight at the engine (no router).

Starts the demo engine with --scheduling-policy priority and --max-num-seqs 2 (or uses
--engine-url), then:

A. priority: 12 batch requests (priority 2) sent at once, then, once the engine's
   `vllm:num_requests_waiting` shows them queued, one interactive request (priority 0):
   the order the answers came back in and the gauges' timeline.
B. busy: short requests back to back at 1, 2 and 6 at a time: the share of /metrics
   samples (every 50 ms) with `vllm:num_requests_running` > 0 against the client's own
   count of requests in flight.

    .venv/bin/python scripts/probe_vllm_gauges.py                    # as spillover runs it
    .venv/bin/python scripts/probe_vllm_gauges.py --worker-process   # vLLM CPU's default
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.routing.load import parse_vllm_metrics  # noqa: E402
from serving.demo_model import build_demo_model  # noqa: E402
from serving.engine import EngineProcess, EngineSpec  # noqa: E402
from tests.fakes import free_port  # noqa: E402

HELLO = [{"role": "user", "content": "Write a long story about a lighthouse."}]


async def probe(url: str, batch: int, tokens: int) -> None:
    root = url.removesuffix("/v1")
    state: dict[str, Any] = {"inflight": 0, "order": [], "samples": [], "stop": False}
    async with httpx.AsyncClient(timeout=300) as c:

        async def metrics() -> tuple[float, float]:
            m = parse_vllm_metrics((await c.get(root + "/metrics")).text)
            return m.running, m.waiting

        async def scrape() -> None:
            while not state["stop"]:
                running, waiting = await metrics()
                state["samples"].append((time.monotonic(), running, waiting,
                                         state["inflight"]))
                await asyncio.sleep(0.05)

        async def send(name: str, priority: int, n: int) -> None:
            state["inflight"] += 1
            try:
                r = await c.post(url + "/chat/completions", json={
                    "model": "demo", "messages": HELLO, "max_tokens": n,
                    "ignore_eos": True, "priority": priority})
                r.raise_for_status()
            finally:
                state["inflight"] -= 1
            state["order"].append(name)

        scraper = asyncio.create_task(scrape())
        await send("warm-up", 0, 8)
        state["order"].clear()
        begun = time.monotonic()
        tasks = [asyncio.create_task(send(f"b{i}", 2, tokens)) for i in range(batch)]
        waiting = 0.0
        while time.monotonic() - begun < 60 and waiting < batch // 2:
            _, waiting = await metrics()
            await asyncio.sleep(0.02)
        print(f"A: interactive sent at {time.monotonic() - begun:.2f} s with {waiting:g} "
              f"batch requests waiting at the engine")
        await asyncio.gather(*tasks, send("interactive", 0, tokens))
        order = state["order"]
        print(f"A: answers in order: {order}; batch after the interactive one: "
              f"{len(order) - 1 - order.index('interactive')} of {batch}")
        for conc in (1, 2, 6):
            first = len(state["samples"])
            start = time.monotonic()

            async def worker(start: float = start) -> None:
                while time.monotonic() - start < 8:
                    await send("short", 2, 32)

            await asyncio.gather(*(worker() for _ in range(conc)))
            part = state["samples"][first:]
            busy = sum(1 for s in part if s[1] > 0) / len(part)
            held = sum(1 for s in part if s[3] > 0) / len(part)
            print(f"B: {conc} at a time: running > 0 in {busy:.0%} of {len(part)} samples, "
                  f"in flight in {held:.0%}; mean running "
                  f"{sum(s[1] for s in part) / len(part):.2f}, mean in flight "
                  f"{sum(s[3] for s in part) / len(part):.2f}")
        state["stop"] = True
        await scraper


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-url", help="an engine's /v1 URL (priority scheduling, two "
                   "sequences at a time) instead of starting the demo engine")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--worker-process", action="store_true",
                   help="run the model in vLLM's worker process, as the CPU build does by "
                   "default (spillover runs it in the engine core: serving/engine.py "
                   "in_process_worker)")
    args = p.parse_args()
    if args.engine_url:
        await probe(args.engine_url, args.batch, args.tokens)
        return
    spec = EngineSpec(
        name="probe", model=str(build_demo_model(ROOT / ".spillover" / "demo-model")),
        served_model_name="demo", port=free_port(), max_model_len=2048,
        scheduling_policy="priority",
        extra_args=("--max-num-seqs", "2", *(("--distributed-executor-backend", "mp")
                                              if args.worker_process else ())),
        env=(("VLLM_CPU_KVCACHE_SPACE", "1"),))
    proc = EngineProcess(spec, log_dir=ROOT / ".spillover" / "probe-logs")
    await proc.start()
    try:
        await proc.wait_ready(timeout=900)
        await probe(spec.base_url, args.batch, args.tokens)
    finally:
        await proc.stop(grace=5)


if __name__ == "__main__":
    asyncio.run(main())
