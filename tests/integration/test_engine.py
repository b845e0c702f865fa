"""Engine launch and supervision, against a fake engine script instead of vLLM."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import httpx
import psutil
import pytest

from serving.engine import (
    EnginePortInUse,
    EngineProcess,
    EngineSpec,
    EngineStartError,
    EngineSupervisor,
    PidRecord,
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
    assert engine_command(spec, python="py", cpu_build=False) == [
        "py", "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/m", "--served-model-name", "demo",
        "--host", "127.0.0.1", "--port", "8101",
        "--scheduling-policy", "priority",
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


def test_a_cpu_engine_runs_its_model_in_the_engine_core() -> None:
    # vLLM's CPU build forces a worker process whose spin-wait starves the engine core's
    # I/O threads (README, "Priority on a CPU engine"): one device runs in-process.
    spec = EngineSpec(name="demo", model="/m", served_model_name="demo", port=8101)
    cmd = engine_command(spec, python="py", cpu_build=True)
    assert cmd[-2:] == ["--distributed-executor-backend", "uni"]
    assert engine_env(spec, base={}, cpu_build=True)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # A GPU build keeps vLLM's own choice.
    assert "--distributed-executor-backend" not in engine_command(spec, "py", cpu_build=False)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(spec, base={}, cpu_build=False)
    # Tensor parallelism needs the workers; an operator's executor is theirs.
    for other in (dataclasses.replace(spec, tensor_parallel_size=2),
                  dataclasses.replace(spec, extra_args=("--distributed-executor-backend", "mp")),
                  dataclasses.replace(spec, extra_args=("--distributed-executor-backend=mp",))):
        cmd = engine_command(other, "py", cpu_build=True)
        assert "uni" not in cmd
        assert sum(a.startswith("--distributed-executor-backend") for a in cmd) == (
            1 if other.extra_args else 0)
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(other, base={}, cpu_build=True)
    # The operator's env still wins.
    forced = dataclasses.replace(spec, env=(("VLLM_ENABLE_V1_MULTIPROCESSING", "1"),))
    assert engine_env(forced, base={}, cpu_build=True)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_this_hosts_vllm_build_is_detected() -> None:
    import importlib.util

    import serving.engine as engine_module
    if importlib.util.find_spec("vllm") is None:
        assert not engine_module.cpu_build_installed()
    spec = EngineSpec(name="demo", model="/m", served_model_name="demo", port=8101)
    assert engine_command(spec, "py") == engine_command(
        spec, "py", cpu_build=engine_module.cpu_build_installed())


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


# --- crash loops --------------------------------------------------------------------------


async def test_a_crash_loop_is_named_and_retried_slowly(tmp_path: Path) -> None:
    """An engine that fails at every start: after a few fast failures the supervisor says
    it is crash-looping, with the last lines of the engine's own log, and waits the slow
    delay instead of restarting it every few seconds."""
    port = free_port()
    spec = make_spec(port)
    supervisor = EngineSupervisor(
        [spec], log_dir=tmp_path,
        backoff=RestartBackoff(initial=0.05, maximum=0.2, reset_after=60.0,
                               crash_loop_after=3, crash_loop_delay=60.0),
        commands={"fake": fake_command(port, "--exit-after", "0.1")},
    )
    try:
        await supervisor.start_all(wait_ready=False)
        await wait_for(lambda: supervisor.crash_looping("fake"), within=30)
        (status,) = supervisor.status()
        assert status.crash_looping and status.failures_in_a_row == 3
        assert status.restarts == 2 and not status.running and status.last_exit_code == 3
        assert status.down_reason is not None
        assert "crash-looping" in status.down_reason
        assert "exited with code 3" in status.down_reason
        # The engine's own words, from its log, and only the latest run's.
        assert "fake engine failing on purpose with code 3" in status.down_reason
        assert status.down_reason.count("fake engine starting") == 1
        assert status.retry_in_s is not None and status.retry_in_s > 30
        assert supervisor.note("fake") == (False, status.down_reason)
        await asyncio.sleep(1.5)  # the fast backoff would have restarted it many times
        assert supervisor.restarts("fake") == 2
    finally:
        await supervisor.stop_all()


async def test_a_long_run_resets_the_crash_count(tmp_path: Path) -> None:
    port = free_port()
    spec = make_spec(port)
    supervisor = EngineSupervisor(
        [spec], log_dir=tmp_path,
        backoff=RestartBackoff(initial=0.05, maximum=0.1, reset_after=0.5,
                               crash_loop_after=2, crash_loop_delay=60.0),
        # Up for 1 s (longer than reset_after) before each exit: never a crash loop.
        commands={"fake": fake_command(port, "--exit-after", "1.0")},
    )
    try:
        await supervisor.start_all(wait_ready=False)
        await wait_for(lambda: supervisor.restarts("fake") >= 2, within=30)
        assert not supervisor.crash_looping("fake")
    finally:
        await supervisor.stop_all()


def test_log_tail_is_the_latest_run_without_colours(tmp_path: Path) -> None:
    engine = EngineProcess(make_spec(1), log_dir=tmp_path)
    engine.log_path.write_text(
        "old run error\n"
        "=== 2026-01-01 00:00:00 spillover starting engine fake: x\n"
        "\x1b[1;31mERROR\x1b[0m new run error\n")
    assert engine.log_tail() == "ERROR new run error"


# --- a port someone already holds ---------------------------------------------------------


def listening_socket(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


async def test_a_port_held_by_a_stranger_is_refused_naming_the_holder(tmp_path: Path) -> None:
    port = free_port()
    with listening_socket(port):
        engine = EngineProcess(make_spec(port), log_dir=tmp_path, command=fake_command(port))
        with pytest.raises(EnginePortInUse) as info:
            await engine.start()
        message = str(info.value)
        assert f"port {port} is already in use by pid {os.getpid()}" in message
        assert "not an engine this router started" in message
        assert engine.pid is None and not engine.running  # nothing was started

        # Under the supervisor: reported, the alias's engine down, and no restart loop.
        supervisor = EngineSupervisor(
            [make_spec(port)], log_dir=tmp_path / "sup",
            backoff=RestartBackoff(initial=0.05, maximum=0.1, crash_loop_delay=60.0),
            commands={"fake": fake_command(port)},
        )
        try:
            await supervisor.start_all(wait_ready=False)
            await asyncio.sleep(1.0)
            (status,) = supervisor.status()
            assert not status.running and status.restarts == 0 and status.pid is None
            note = supervisor.note("fake")
            assert note is not None and note[0] is False
            assert f"port {port} is already in use by pid {os.getpid()}" in note[1]
            assert not (tmp_path / "sup" / "fake.log").exists()  # never launched
        finally:
            await supervisor.stop_all()


def start_orphan(port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A fake engine in its own process group, as a router that died would leave one."""
    return subprocess.Popen(fake_command(port), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


async def wait_listening(port: int) -> None:
    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    await wait_for(up, within=20)


def record_for(orphan: subprocess.Popen[bytes], spec: EngineSpec) -> PidRecord:
    return PidRecord(
        pgid=orphan.pid, started=psutil.Process(orphan.pid).create_time(),
        router_pid=dead_pid(), router_started=0.0, host=spec.host, port=spec.port,
        model=spec.model, served_model_name=spec.served_model_name)


async def test_its_own_engine_from_an_earlier_run_is_adopted(tmp_path: Path) -> None:
    port = free_port()
    spec = make_spec(port)
    orphan = start_orphan(port, tmp_path)
    try:
        await wait_listening(port)
        engine = EngineProcess(spec, log_dir=tmp_path, command=fake_command(port))
        record_for(orphan, spec).write(engine.pid_path)
        await engine.start()
        assert engine.adopted and engine.running and engine.pid == orphan.pid
        assert engine.pgid == orphan.pid
        await engine.wait_ready(timeout=10)
        await engine.stop(grace=5)
        assert orphan.wait(5) == -signal.SIGTERM
        assert not engine.running and not engine.pid_path.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(5)


async def test_a_pidfile_for_another_model_is_no_proof(tmp_path: Path) -> None:
    port = free_port()
    spec = make_spec(port)
    orphan = start_orphan(port, tmp_path)
    try:
        await wait_listening(port)
        engine = EngineProcess(spec, log_dir=tmp_path, command=fake_command(port))
        other = dataclasses.replace(spec, served_model_name="another-model")
        record_for(orphan, other).write(engine.pid_path)
        with pytest.raises(EnginePortInUse, match=f"already in use by pid {orphan.pid} "):
            await engine.start()
        assert orphan.poll() is None  # not ours: left alone
    finally:
        orphan.kill()
        orphan.wait(5)


async def test_an_earlier_engine_that_serves_another_model_is_replaced(tmp_path: Path) -> None:
    """Provably ours (pidfile, process group) but /v1/models does not list what the
    config says it serves: stopped, and a new engine started in its place."""
    port = free_port()
    spec = EngineSpec(name="fake", model="unused", served_model_name="demo", port=port)
    orphan = start_orphan(port, tmp_path)
    engine = EngineProcess(spec, log_dir=tmp_path, command=fake_command(port))
    try:
        await wait_listening(port)
        record_for(orphan, spec).write(engine.pid_path)
        await engine.start()
        assert orphan.wait(10) is not None
        assert not engine.adopted and engine.running and engine.pgid != orphan.pid
        await engine.wait_ready(timeout=20)
        record = PidRecord.read(engine.pid_path)
        assert record is not None and record.pgid == engine.pgid
    finally:
        await engine.stop(grace=2)
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(5)


# --- engines die with their router --------------------------------------------------------

ROUTER_STANDIN = """
import asyncio, sys
from pathlib import Path
from serving.engine import EngineProcess, EngineSpec

async def main() -> None:
    port, log_dir, child_file = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    spec = EngineSpec(name="fake", model="unused", served_model_name="fake", port=port)
    cmd = [sys.executable, sys.argv[4], str(port), "--child-pid-file", child_file]
    engine = EngineProcess(spec, log_dir=log_dir, command=cmd)
    await engine.start()
    await engine.wait_ready(timeout=20)
    print(engine.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_engine_and_its_children_die_with_the_router(tmp_path: Path) -> None:
    """kill -9 of the router: the engine and the process it spawned (EngineCore in vLLM)
    are gone within seconds, and the port is free again."""
    port = free_port()
    child_file = tmp_path / "child.pid"
    root = Path(__file__).resolve().parents[2]
    router = subprocess.Popen(
        [sys.executable, "-c", ROUTER_STANDIN, str(port), str(tmp_path), str(child_file),
         str(FAKE_SERVER)],
        stdout=subprocess.PIPE, cwd=root, start_new_session=True)
    try:
        assert router.stdout is not None
        engine_pid = int(router.stdout.readline())
        child = int(child_file.read_text())
        guard = psutil.Process(engine_pid).ppid()
        assert guard != router.pid and psutil.Process(guard).ppid() == router.pid
        assert os.getpgid(engine_pid) == os.getpgid(child) == guard
        router.kill()
        router.wait(5)
        deadline = time.monotonic() + 10
        while not all(gone(p) for p in (engine_pid, child, guard)):
            assert time.monotonic() < deadline, "an engine process outlived its router"
            time.sleep(0.1)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if router.poll() is None:
            router.kill()
            router.wait(5)


# --- a typo in a model path ---------------------------------------------------------------

TYPO_YAML = """\
aliases:
  demo:
    local:
      - name: demo-local
        model: {model}
        license: apache-2.0
      - name: elsewhere
        model: /no/such/dir
        license: apache-2.0
        base_url: http://10.0.0.1:8000/v1
"""


def write_model_config(tmp_path: Path, model: str) -> Path:
    cfg = tmp_path / "models.yaml"
    cfg.write_text(TYPO_YAML.format(model=model))
    return cfg


@pytest.mark.parametrize(("model", "problem"), [
    (".spillover/demo-modle", ".spillover/demo-modle does not exist (relative to"),
    ("/no/such/model", "/no/such/model does not exist"),
    ("~/no-such-model-here", "~/no-such-model-here does not exist"),
    ("weights/demo-modle", "weights/demo-modle does not exist"),  # ./weights exists
    ("weights/empty", "weights/empty holds no model (no config.json or params.json)"),
    ("weights/notes.txt", "weights/notes.txt is a file, not a model directory"),
])
def test_check_refuses_a_local_model_path_with_its_line(
        tmp_path: Path, model: str, problem: str) -> None:
    (tmp_path / "weights" / "empty").mkdir(parents=True)
    (tmp_path / "weights" / "notes.txt").write_text("x")
    cfg = write_model_config(tmp_path, model)
    r = subprocess.run([sys.executable, "-m", "router.cli", "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1, r.stdout
    assert f"line 5: aliases.demo.local.0.model: {problem}" in r.stderr
    # A deployment run elsewhere (base_url) is not this machine's to check.
    assert "local.1" not in r.stderr


@pytest.mark.parametrize("model", [
    "weights/demo",  # a directory with config.json
    "weights/mistral-format",  # Mistral's params.json
    "weights/model.gguf",
    "mistralai/Mistral-Small-3.2-24B-Instruct-2506",  # a hub id: not a path
    "demo",
])
def test_check_accepts_models_that_exist_and_hub_ids(tmp_path: Path, model: str) -> None:
    from router.config import load_config, model_path_problems

    (tmp_path / "weights" / "demo").mkdir(parents=True)
    (tmp_path / "weights" / "demo" / "config.json").write_text("{}")
    (tmp_path / "weights" / "mistral-format").mkdir()
    (tmp_path / "weights" / "mistral-format" / "params.json").write_text("{}")
    (tmp_path / "weights" / "model.gguf").write_bytes(b"GGUF")
    cfg = write_model_config(tmp_path, model)
    assert model_path_problems(load_config(cfg), cfg, cwd=tmp_path) == []


def test_serve_refuses_a_model_path_typo_before_starting_anything(tmp_path: Path) -> None:
    cfg = write_model_config(tmp_path, "./demo-modle")
    r = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1
    assert "line 5: aliases.demo.local.0.model: ./demo-modle does not exist" in r.stderr


# --- the down reason the router shows -----------------------------------------------------


async def test_a_stopped_engine_is_down_whatever_answers_on_its_port() -> None:
    """The supervisor's word wins over probes while its engine is not running: an orphan or
    another program answering on the port is not the engine (no traffic goes there)."""
    from router.routing.catalog import Catalog
    from router.routing.load import LoadMonitor
    from tests.unit.helpers import World, config

    notes: dict[str, tuple[bool, str] | None] = {"demo-local": None}
    client = httpx.AsyncClient(transport=World().transport())
    monitor = LoadMonitor(client, Catalog(config()).all(), engine_note=notes.get)
    await monitor.refresh()
    assert monitor.view()["demo-local"].healthy
    notes["demo-local"] = (False, "engine exited with code 1; last lines:\nbad model path")
    await monitor.refresh()
    status = monitor.status()["demo-local"]
    assert not status["healthy"]
    assert status["down_reason"] == "engine exited with code 1; last lines:\nbad model path"
    await client.aclose()


def test_secrets_in_an_engine_log_tail_are_masked(tmp_path: Path) -> None:
    engine = EngineProcess(make_spec(1), log_dir=tmp_path)
    engine.log_path.write_text(
        "non-default args: {'model': '/m', 'api_key': 'sk-live-123', 'port': 8101}\n"
        "vllm serve /m --api-key sk-live-123 --hf-token=hf_abc\n")
    tail = engine.log_tail()
    assert "sk-live-123" not in tail and "hf_abc" not in tail
    assert "'model': '/m'" in tail and "'api_key': '***'" in tail
