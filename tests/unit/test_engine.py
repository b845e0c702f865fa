"""Engine launch and supervision, against a fake engine script instead of vLLM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import httpx
import psutil
import pytest

from serving.engine import (
    EngineProcess,
    EngineSpec,
    EngineStartError,
    EngineSupervisor,
    RestartBackoff,
    engine_command,
    engine_env,
    read_log_tail,
)

FAKE_SERVER = Path(__file__).with_name("fake_engine_server.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fake_command(port: int, *args: str) -> list[str]:
    return [sys.executable, str(FAKE_SERVER), str(port), *args]


def make_spec(port: int, name: str = "fake") -> EngineSpec:
    return EngineSpec(name=name, model="unused", served_model_name="fake", port=port)


def gone(pid: int) -> bool:
    """True once pid no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def wait_for(predicate: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def wait_file(path: Path, within: float = 10.0) -> str:
    """The content of path once a child process has written it."""
    await wait_for(lambda: path.exists() and path.read_text() != "", within)
    return path.read_text()  # noqa: ASYNC240 - a few bytes, already known to be there


@pytest.fixture
async def engines() -> AsyncIterator[list[EngineProcess]]:
    """Collects EngineProcess objects and stops them all, even when a test fails."""
    started: list[EngineProcess] = []
    yield started
    await asyncio.gather(*(e.stop(grace=2.0) for e in started))


def new_engine(
    engines: list[EngineProcess], tmp_path: Path, port: int, args: Sequence[str] = ()
) -> EngineProcess:
    engine = EngineProcess(
        make_spec(port), log_dir=tmp_path / "logs", command=fake_command(port, *args)
    )
    engines.append(engine)
    return engine


# --- command line and environment -------------------------------------------------------


def test_command_minimal() -> None:
    spec = EngineSpec(name="demo", model="/m", served_model_name="demo", port=8101)
    assert engine_command(spec, python="py") == [
        "py", "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/m", "--served-model-name", "demo",
        "--host", "127.0.0.1", "--port", "8101",
    ]  # fmt: skip


def test_command_all_options() -> None:
    spec = EngineSpec(
        name="big",
        model="mistralai/Mistral-Small",
        served_model_name="mistral-small",
        host="0.0.0.0",
        port=9000,
        max_model_len=32768,
        gpu_memory_utilization=0.85,
        tensor_parallel_size=2,
        extra_args=("--enforce-eager", "--tool-call-parser", "mistral"),
    )
    cmd = engine_command(spec, python="py")
    assert cmd[-3:] == ["--enforce-eager", "--tool-call-parser", "mistral"]
    joined = " ".join(cmd)
    assert "--max-model-len 32768" in joined
    assert "--gpu-memory-utilization 0.85" in joined
    assert "--tensor-parallel-size 2" in joined
    assert "--host 0.0.0.0 --port 9000" in joined
    # A wildcard bind is reached through loopback.
    assert spec.base_url == "http://127.0.0.1:9000/v1"
    assert spec.health_url == "http://127.0.0.1:9000/health"


def test_env_defaults_and_overrides() -> None:
    spec = EngineSpec(
        name="e", model="m", served_model_name="m", port=1, env=(("CUDA_VISIBLE_DEVICES", "1"),)
    )
    env = engine_env(spec, base={"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "4"})
    assert env["PATH"] == "/bin"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"  # an operator's value wins over ours
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert engine_env(spec, base={})["VLLM_CPU_KVCACHE_SPACE"] == "1"
    online = EngineSpec(
        name="e", model="m", served_model_name="m", port=1, env=(("HF_HUB_OFFLINE", "0"),)
    )
    assert engine_env(online, base={})["HF_HUB_OFFLINE"] == "0"


def test_backoff_doubles_caps_and_resets() -> None:
    b = RestartBackoff(initial=1.0, maximum=30.0, factor=2.0, reset_after=60.0)
    delays: list[float] = []
    previous: float | None = None
    for _ in range(7):
        previous = b.next_delay(previous, uptime=1.0)
        delays.append(previous)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.next_delay(30.0, uptime=61.0) == 1.0


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    assert read_log_tail(log) == ""
    log.write_text("".join(f"line {i}\n" for i in range(5000)))
    assert read_log_tail(log, 3) == "line 4997\nline 4998\nline 4999"
    assert read_log_tail(log, 0) == ""


# --- processes ----------------------------------------------------------------------------


async def test_start_wait_ready_and_stop(tmp_path: Path, engines: list[EngineProcess]) -> None:
    port = free_port()
    engine = new_engine(engines, tmp_path, port, ["--ready-after", "0.5"])
    await engine.start()
    assert engine.running and engine.pid is not None
    await engine.wait_ready(timeout=20)
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        models = (await client.get(f"{engine.spec.base_url}/models")).json()
    assert models["data"][0]["id"] == "fake"
    await engine.stop(grace=5)
    assert not engine.running
    assert engine.returncode == -signal.SIGTERM
    # The engine's output went to its log file, after our header line.
    log = engine.log_path.read_text()
    assert "spillover starting engine fake" in log
    assert "fake engine ready" in log


async def test_start_twice_is_refused(tmp_path: Path, engines: list[EngineProcess]) -> None:
    engine = new_engine(engines, tmp_path, free_port())
    await engine.start()
    with pytest.raises(RuntimeError, match="already running"):
        await engine.start()


async def test_wait_ready_fails_fast_with_log_tail(
    tmp_path: Path, engines: list[EngineProcess]
) -> None:
    engine = new_engine(engines, tmp_path, free_port(), ["--exit-after", "0.2"])
    await engine.start()
    started = time.monotonic()
    with pytest.raises(EngineStartError) as info:
        await engine.wait_ready(timeout=60)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "exited with code 3" in message
    assert "failing on purpose" in message


async def test_wait_ready_times_out_with_log_tail(
    tmp_path: Path, engines: list[EngineProcess]
) -> None:
    engine = new_engine(engines, tmp_path, free_port(), ["--ready-after", "3600"])
    await engine.start()
    with pytest.raises(EngineStartError, match="not healthy") as info:
        await engine.wait_ready(timeout=1.5)
    assert "fake engine ready" in str(info.value)
    assert engine.running  # a timeout reports; stopping is the caller's decision


async def test_stop_kills_the_whole_process_group(
    tmp_path: Path, engines: list[EngineProcess]
) -> None:
    child_file = tmp_path / "child.pid"
    engine = new_engine(engines, tmp_path, free_port(), ["--child-pid-file", str(child_file)])
    await engine.start()
    child = int(await wait_file(child_file))
    await engine.wait_ready(timeout=20)
    assert not gone(child)
    await engine.stop(grace=5)
    await wait_for(lambda: gone(child), within=5)


async def test_stop_escalates_to_sigkill(tmp_path: Path, engines: list[EngineProcess]) -> None:
    engine = new_engine(engines, tmp_path, free_port(), ["--ignore-sigterm"])
    await engine.start()
    await engine.wait_ready(timeout=20)
    started = time.monotonic()
    await engine.stop(grace=0.5)
    assert engine.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 8


async def test_stop_before_start_is_a_no_op(tmp_path: Path) -> None:
    engine = EngineProcess(make_spec(free_port()), log_dir=tmp_path)
    await engine.stop()
    assert engine.pid is None and not engine.running


async def test_missing_executable_raises(tmp_path: Path) -> None:
    engine = EngineProcess(
        make_spec(free_port()), log_dir=tmp_path, command=[str(tmp_path / "no-such-binary")]
    )
    with pytest.raises(FileNotFoundError):
        await engine.start()


# --- supervision --------------------------------------------------------------------------


async def test_supervisor_restarts_a_killed_engine(tmp_path: Path) -> None:
    port = free_port()
    child_file = tmp_path / "child.pid"
    spec = make_spec(port)
    supervisor = EngineSupervisor(
        [spec],
        log_dir=tmp_path,
        backoff=RestartBackoff(initial=0.1, maximum=1.0),
        stop_grace=2.0,
        commands={spec.name: fake_command(port, "--child-pid-file", str(child_file))},
    )
    try:
        await supervisor.start_all(wait_ready=True, timeout=20)
        engine = supervisor.engines["fake"]
        first_pid = engine.pid
        first_child = int(await wait_file(child_file))
        assert first_pid is not None and supervisor.restarts("fake") == 0
        child_file.unlink()

        os.kill(first_pid, signal.SIGKILL)

        await wait_for(lambda: supervisor.restarts("fake") == 1, within=15)
        assert engine.pid != first_pid
        await engine.wait_ready(timeout=20)
        # The killed leader's orphan was cleaned up before the new engine started.
        assert gone(first_child)
        (status,) = supervisor.status()
        assert status.running and status.restarts == 1
        assert status.last_exit_code == -signal.SIGKILL
    finally:
        await supervisor.stop_all()
    assert not engine.running
    second_child = int(await wait_file(child_file))
    await wait_for(lambda: gone(second_child), within=5)
    await asyncio.sleep(0.3)
    assert supervisor.restarts("fake") == 1  # stopping is not a crash: no restart


async def test_supervisor_start_failure_stops_everything(tmp_path: Path) -> None:
    good, bad = make_spec(free_port(), "good"), make_spec(free_port(), "bad")
    supervisor = EngineSupervisor(
        [good, bad],
        log_dir=tmp_path,
        commands={
            "good": fake_command(good.port),
            "bad": fake_command(bad.port, "--exit-after", "0.2"),
        },
    )
    with pytest.raises(EngineStartError, match="bad"):
        await supervisor.start_all(wait_ready=True, timeout=20)
    assert not any(e.running for e in supervisor.engines.values())


async def test_supervisor_as_context_manager(tmp_path: Path) -> None:
    port = free_port()
    spec = make_spec(port)
    supervisor = EngineSupervisor(
        [spec], log_dir=tmp_path, ready_timeout=20, commands={"fake": fake_command(port)}
    )
    async with supervisor:
        assert supervisor.engines["fake"].running
    assert not supervisor.engines["fake"].running


def test_supervisor_rejects_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        EngineSupervisor([make_spec(1), make_spec(2)], log_dir=tmp_path)
