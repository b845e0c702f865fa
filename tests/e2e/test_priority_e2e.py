"""Traffic classes on the real engine: an interactive request passes queued batch work.

The module brings its own engine (it overrides the session's `engine` fixture): vLLM with
--scheduling-policy priority and two sequences at a time, so that batch requests queue
inside the engine, where only vLLM's scheduler can let the interactive one pass them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from serving.demo_model import build_demo_model
from serving.engine import KILLED_EXIT_S, EngineProcess, EngineSpec
from tests.e2e.conftest import ROOT, Engine, Hosted, LoopThread, Router, e2e_config
from tests.fakes import free_port

# Opt-in, not part of ./scripts/test.sh: in full e2e runs on the shared 2-core machine the
# ordering it asserts did not hold reliably (once the batch was never seen queued at the
# engine; once all 16 batch answers finished before the interactive one, as if the engine
# ran more than two sequences at a time). Until that is understood it is run by hand:
# SPILLOVER_PRIORITY_E2E=1 .venv/bin/pytest tests/e2e/test_priority_e2e.py
pytestmark = pytest.mark.skipif(
    os.environ.get("SPILLOVER_PRIORITY_E2E") != "1",
    reason="ordering under load not yet reliable: run with SPILLOVER_PRIORITY_E2E=1")

HELLO = [{"role": "user", "content": "Write a long story about a lighthouse."}]
BATCH = 16
TOKENS = 640  # long enough that a poll delayed by the busy engine still sees the queue


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    model_dir = build_demo_model(ROOT / ".spillover" / "demo-model")
    spec = EngineSpec(
        name="demo-local", model=str(model_dir), served_model_name="demo",
        port=free_port(), max_model_len=2048, scheduling_policy="priority",
        # Two sequences at a time: the rest of the batch waits in vLLM's queue.
        extra_args=("--max-num-seqs", "2"),
        env=(("VLLM_CPU_KVCACHE_SPACE", "1"),),
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


def test_interactive_passes_queued_batch_work(make_router: Any, engine: Engine,
                                              plateforme: Hosted, backup: Hosted) -> None:
    alias = e2e_config(engine.base_url, plateforme.url, backup.url)["aliases"]["demo"]
    alias["local"][0].update(
        scheduling_policy="priority",
        # Room for the whole batch in the router: the queue must form inside the engine.
        saturation={"max_waiting": 64, "max_inflight": 64, "batch_below": 1.0})
    router: Router = make_router(extra={"aliases": {"demo": alias}})
    finished: dict[str, float] = {}
    ttft: dict[str, float] = {}
    classes: dict[str, str] = {}
    errors: list[BaseException] = []

    def send(name: str, priority: str) -> None:
        # The batch is sent whole, not streamed: the router runs in this process, and 16
        # threads parsing token streams took the interpreter from it, so it admitted the
        # batch a few requests at a time and the queue never formed at the engine.
        streamed = priority == "interactive"
        try:
            t0 = time.monotonic()
            raw = router.client.chat.completions.with_raw_response.create(
                model="demo", messages=HELLO, max_tokens=TOKENS, stream=streamed,
                extra_headers={"x-spillover-priority": priority},
                # Random weights would stop at a random EOS: every answer is TOKENS long.
                extra_body={"ignore_eos": True})
            classes[name] = raw.headers["x-spillover-priority"]
            assert raw.headers["x-spillover-route"] == "local"
            if streamed:
                for chunk in raw.parse():
                    if name not in ttft and chunk.choices and chunk.choices[0].delta.content:
                        ttft[name] = time.monotonic() - t0
            else:
                raw.parse()
            finished[name] = time.monotonic()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(f"batch-{i}", "batch"), daemon=True)
               for i in range(BATCH)]
    for t in threads:
        t.start()
    # The batch is in: every request at the engine (the router's in-flight count; vLLM's
    # own gauges lag by seconds) and generating, two at a time, the rest queued there.
    begun = time.monotonic()
    deadline = begun + 120
    # What the wait saw, each time it changed: the failure message says where it stuck.
    seen: list[tuple[float, Any, Any, Any, int, int]] = []
    while not errors and time.monotonic() < deadline:
        engine_state = router.get("/readyz").json()["engines"]["demo-local"]
        now = (engine_state["inflight"], engine_state["running"], engine_state["waiting"],
               len(ttft), len(finished))
        if not seen or seen[-1][1:] != now:
            seen.append((round(time.monotonic() - begun, 2), *now))
        # Every batch request admitted: at the engine now or already done (on a loaded
        # machine the first ones may finish before the last arrive; how many are still
        # queued is asserted below, not waited for).
        if engine_state["inflight"] + len(finished) == BATCH:
            break
        time.sleep(0.05)
    assert not errors, errors
    assert engine_state["inflight"] + len(finished) == BATCH, (
        engine_state, "(s, inflight, running, waiting, first tokens, finished):", seen[-40:],
        engine.process.log_tail(40))
    queued_before = BATCH - len(finished)
    sent = time.monotonic()
    interactive = threading.Thread(target=send, args=("interactive", "interactive"))
    interactive.start()
    interactive.join(120)
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert classes["interactive"] == "interactive"
    assert {classes[f"batch-{i}"] for i in range(BATCH)} == {"batch"}
    done = finished["interactive"]
    batch_after = sum(1 for i in range(BATCH) if finished[f"batch-{i}"] > done)
    print(f"\ninteractive: sent with {queued_before} batch requests unfinished, "
          f"finished after {done - sent:.2f} s, TTFT {ttft['interactive']:.2f} s; "
          f"{batch_after} batch requests finished "
          "after it")
    # First come first served, it would finish after every one of them. With priority
    # scheduling it waits only for a running sequence to end: it passes all but the two
    # running (and one that may get its slot while the interactive request is on its way).
    assert queued_before >= BATCH - 4
    assert batch_after >= queued_before - 3, (batch_after, queued_before)
    # The ledger has each call under its class (a stream's row lands as it closes).
    by_class: dict[str, int] = {}
    for _ in range(50):
        usage = router.get("/v1/usage?group_by=priority").json()
        by_class = {g["priority"]: g["requests"] for g in usage["data"]}
        if sum(by_class.values()) == BATCH + 1:
            break
        time.sleep(0.1)
    assert by_class == {"batch": BATCH, "interactive": 1}
