from __future__ import annotations

import httpx
import pytest

from router.routing.catalog import Catalog
from router.routing.load import LoadMonitor, parse_vllm_metrics
from tests.unit.helpers import BASE_YAML, METRICS_IDLE, World, config

OLD_VLLM = """# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="a"} 0.25
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 2
vllm:num_requests_running{model_name="b"} 3
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="a"} 5
"""


def test_parse_current_and_old_metric_names() -> None:
    m = parse_vllm_metrics(METRICS_IDLE % {"waiting": 2, "kv": 0.5})
    assert (m.waiting, m.running, m.kv_cache, m.generation_tokens) == (2, 0, 0.5, 1234)
    old = parse_vllm_metrics(OLD_VLLM)
    assert old.kv_cache == 0.25 and old.running == 5 and old.waiting == 0


@pytest.fixture
async def monitor() -> LoadMonitor:
    world = World()
    client = httpx.AsyncClient(transport=world.transport())
    mon = LoadMonitor(client, Catalog(config()).all(), stale_s=60)
    mon.world = world  # type: ignore[attr-defined]
    return mon


async def test_inflight_saturates_with_hysteresis(monitor: LoadMonitor) -> None:
    await monitor.refresh()
    # max_inflight 4, resume_below 0.5
    for _ in range(4):
        monitor.acquire("demo-local")
    assert monitor.view()["demo-local"].saturated
    monitor.release("demo-local")  # 3/4 = 0.75: still above the low watermark
    assert monitor.view()["demo-local"].saturated
    monitor.release("demo-local")  # 2/4 = 0.5: not below it yet
    assert monitor.view()["demo-local"].saturated
    monitor.release("demo-local")  # 1/4
    assert not monitor.view()["demo-local"].saturated
    monitor.acquire("demo-local")
    monitor.acquire("demo-local")  # 3/4 below the high mark: stays accepting
    assert not monitor.view()["demo-local"].saturated


async def test_batch_requests_do_not_fill_a_priority_engine_for_urgent_ones(
        monitor: LoadMonitor) -> None:
    """demo-local is started by spillover, so it schedules by priority: its batch requests
    count for batch admission (and the status page), not for interactive or standard."""
    await monitor.refresh()
    for _ in range(4):  # max_inflight 4, every one batch
        monitor.acquire("demo-local", batch=True)
    load = monitor.view()["demo-local"]
    assert load.saturated and load.score == 1.0 and load.batch_inflight == 4
    # Only the KV-cache gauge (0.1 of max_kv_cache 0.9) is left: no request counts.
    assert load.urgent_saturated is False and load.urgent_score == pytest.approx(0.1 / 0.9)
    for _ in range(4):  # now interactive fills it for everyone
        monitor.acquire("demo-local")
    load = monitor.view()["demo-local"]
    assert load.urgent_saturated and load.urgent_score == 1.0 and load.inflight == 8
    assert monitor.status()["demo-local"]["batch_inflight"] == 4
    for _ in range(4):
        monitor.release("demo-local", batch=True)
    load = monitor.view()["demo-local"]
    assert load.batch_inflight == 0 and load.inflight == 4 and load.urgent_score == 1.0
    for _ in range(4):
        monitor.release("demo-local")
    assert not monitor.view()["demo-local"].urgent_saturated  # hysteresis, as for all


async def test_an_fcfs_engine_counts_every_request_for_every_class() -> None:
    world = World()
    # An engine run elsewhere (base_url): first-come-first-served unless it says otherwise.
    fcfs = config(BASE_YAML.replace("        port: 8101\n",
                                    "        base_url: http://127.0.0.1:8101/v1\n"))
    assert fcfs.aliases["demo"].local[0].engine_scheduling == "fcfs"
    mon = LoadMonitor(httpx.AsyncClient(transport=world.transport()), Catalog(fcfs).all(),
                      stale_s=60)
    await mon.refresh()
    for _ in range(4):
        mon.acquire("demo-local", batch=True)
    load = mon.view()["demo-local"]
    assert load.saturated and load.urgent_score is None and load.urgent_saturated is None


async def test_waiting_queue_saturates_and_down_is_noticed(monitor: LoadMonitor) -> None:
    world: World = monitor.world  # type: ignore[attr-defined]
    world.waiting = 1
    await monitor.refresh()
    load = monitor.view()["demo-local"]
    assert load.healthy and load.saturated and load.waiting == 1
    world.waiting = 0
    await monitor.refresh()
    assert not monitor.view()["demo-local"].saturated
    world.local_up = False
    await monitor.refresh()
    assert not monitor.view()["demo-local"].healthy
    assert "unreachable" in str(monitor.status()["demo-local"]["down_reason"])


async def test_stale_metrics_fall_back_to_inflight() -> None:
    world = World(waiting=5)
    client = httpx.AsyncClient(transport=world.transport())
    mon = LoadMonitor(client, Catalog(config()).all(), stale_s=0.0)
    await mon.refresh()
    load = mon.view()["demo-local"]
    assert load.waiting is None and not load.saturated  # 5 waiting, but too old to trust


async def test_slow_probe_is_load_until_it_lasts() -> None:
    world = World()
    slow = {"on": False}

    def handler(req: httpx.Request) -> httpx.Response:
        if slow["on"]:
            raise httpx.ReadTimeout("slow", request=req)
        return world.transport().handle_request(req)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    mon = LoadMonitor(client, Catalog(config()).all(), stale_s=60)
    await mon.refresh()
    slow["on"] = True
    await mon.refresh()
    load = mon.view()["demo-local"]
    assert load.healthy and load.saturated
    mon._stale = 0.0  # the slowness has now lasted longer than the staleness bound
    await mon.refresh()
    assert not mon.view()["demo-local"].healthy


# What vLLM 0.32 serves (scraped from the demo engine with 4 requests in flight, two
# sequences at a time): the waiting gauge has a by-reason sibling that shares its prefix.
VLLM_032 = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="demo"} 2.0
# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="demo",reason="capacity"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="demo",reason="deferred"} 0.0
"""


def test_parse_vllm_032_page_counts_each_gauge_once() -> None:
    m = parse_vllm_metrics(VLLM_032)
    assert (m.running, m.waiting) == (2, 2)


async def test_max_running_counts_the_routers_requests_the_gauge_does_not_see() -> None:
    """vLLM's running gauge misses requests its API server is preparing or answering: with
    the gauge at 0 and nothing queued, the router's own in-flight requests count against
    max_running (2 of 2: saturated)."""
    world = World()
    client = httpx.AsyncClient(transport=world.transport())
    cfg = config(BASE_YAML.replace("max_inflight: 4,", "max_inflight: 4, max_running: 2,"))
    mon = LoadMonitor(client, Catalog(cfg).all(), stale_s=60)
    await mon.refresh()
    assert not mon.view()["demo-local"].saturated
    mon.acquire("demo-local")
    mon.acquire("demo-local")  # 2 of max_inflight 4: only max_running can saturate it
    load = mon.view()["demo-local"]
    assert load.running == 0 and load.saturated
