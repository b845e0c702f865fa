"""Traffic classes on the real engine: an interactive request passes queued batch work.

The module brings its own engine (it overrides the session's `engine` fixture): vLLM with
--scheduling-policy priority and two sequences at a time, so that batch requests queue
inside the engine, where only vLLM's scheduler can let the interactive one pass them. (The
session's engine cannot be shared: at vLLM's CPU default of 128 sequences, no queue forms.)

What is asserted is read where it happens, not inferred from timing: the batch is seen
queued in the engine's own gauges (vLLM /metrics) before the interactive request is sent,
and the order the engine finished them in is the order their whole (non-streamed) answers
came back. Each answer is long (seconds a pair of sequences here), so a few hundred
milliseconds of a loaded machine's delay cannot reorder them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from router.routing.load import parse_vllm_metrics
from serving.demo_model import build_demo_model
from serving.engine import KILLED_EXIT_S, EngineProcess, EngineSpec
from tests.e2e.conftest import ROOT, Engine, Hosted, LoopThread, Router, e2e_config
from tests.fakes import free_port

HELLO = [{"role": "user", "content": "Write a long story about a lighthouse."}]
BATCH = 12
# A pair of these takes about 3 s on this host's engine (the model in the engine core), so
# the batch queues for about 18 s: at 384 tokens it was done 4 s after the interactive
# request was sent, before a loaded test process had passed it to the engine.
TOKENS = 1536


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    model_dir = build_demo_model(ROOT / ".spillover" / "demo-model")
    spec = EngineSpec(
        name="demo-local", model=str(model_dir), served_model_name="demo",
        port=free_port(), max_model_len=2048, scheduling_policy="priority",
        # Two sequences at a time: the rest of the batch waits in vLLM's queue.
        extra_args=("--max-num-seqs", "2"),
        # Its log says every second how many requests run and wait (for a failure's message).
        env=(("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_LOG_STATS_INTERVAL", "1")),
    )
    loop = LoopThread()
    proc = EngineProcess(spec, log_dir=tmp_path_factory.mktemp("priority-engine-logs"))
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


def _engine_queue(engine: Engine) -> tuple[float, float]:
    """(running, waiting) as the engine's own gauges say now."""
    text = httpx.get(engine.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    m = parse_vllm_metrics(text)
    return m.running, m.waiting


def test_interactive_passes_queued_batch_work(make_router: Any, engine: Engine,
                                              plateforme: Hosted, backup: Hosted) -> None:
    alias = e2e_config(engine.base_url, plateforme.url, backup.url)["aliases"]["demo"]
    alias["local"][0].update(
        scheduling_policy="priority",
        # Room for the whole batch in the router: the queue must form inside the engine.
        saturation={"max_waiting": 64, "max_inflight": 64, "batch_below": 1.0})
    # The last of the batch waits for every pair before it: minutes on a loaded machine.
    router: Router = make_router(extra={"aliases": {"demo": alias}}, request_timeout_s=300)
    client = router.client.with_options(timeout=300)
    order: list[str] = []  # names, in the order their answers came back
    classes: dict[str, str] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def send(name: str, priority: str) -> None:
        # Whole answers, not streams: the router runs in this process, and threads parsing
        # token streams take the interpreter from it (a streamed answer's end, relayed and
        # parsed chunk by chunk, came seconds after the engine finished it).
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="demo", messages=HELLO, max_tokens=TOKENS,
                extra_headers={"x-spillover-priority": priority},
                # Random weights would stop at a random EOS: every answer is TOKENS long.
                extra_body={"ignore_eos": True})
            answer = raw.parse()
            assert raw.headers["x-spillover-route"] == "local"
            assert answer.usage is not None and answer.usage.completion_tokens == TOKENS
            with lock:
                classes[name] = raw.headers["x-spillover-priority"]
                order.append(name)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(f"batch-{i}", "batch"), daemon=True)
               for i in range(BATCH)]
    for t in threads:
        t.start()
    # The batch queued at the engine, as its own gauges say: sequences running, most of the
    # batch waiting (a generous bound detects an outage, nothing is timed).
    begun = time.monotonic()
    seen: list[tuple[float, float, float, int]] = []
    running = waiting = 0.0
    while not errors and time.monotonic() - begun < 120:
        running, waiting = _engine_queue(engine)
        if not seen or seen[-1][1:] != (running, waiting, len(order)):
            seen.append((round(time.monotonic() - begun, 2), running, waiting, len(order)))
        if waiting >= BATCH - 4:
            break
        time.sleep(0.02)
    assert not errors, errors
    assert running >= 1 and waiting >= BATCH - 4, (
        "the batch never queued at the engine; (s, running, waiting, answered):", seen,
        engine.process.log_tail(20))
    with lock:
        answered_before = len(order)
    interactive = threading.Thread(target=send, args=("interactive", "interactive"))
    interactive.start()
    interactive.join(300)
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert classes["interactive"] == "interactive"
    assert {classes[f"batch-{i}"] for i in range(BATCH)} == {"batch"}
    batch_after = len(order) - 1 - order.index("interactive")
    print(f"\ninteractive sent with {int(waiting)} batch requests waiting at the engine "
          f"({answered_before} answered); {batch_after} batch requests finished after it; "
          f"order: {order}")
    # First come first served, it would wait for every queued request: at most the one
    # running beside it finishes after it. With priority scheduling it takes the first
    # free sequence: all but a few of the queued finish after it (half is the bound).
    assert batch_after >= waiting // 2, (order, waiting, engine.process.log_tail(30))
    # The ledger has each call under its class.
    by_class: dict[str, int] = {}
    for _ in range(50):
        usage = router.get("/v1/usage?group_by=priority").json()
        by_class = {g["priority"]: g["requests"] for g in usage["data"]}
        if sum(by_class.values()) == BATCH + 1:
            break
        time.sleep(0.1)
    assert by_class == {"batch": BATCH, "interactive": 1}
